"""The runtime step of ``python -m export``: build each candidate backbone runtime beside the traced ``backbone.pt``,
prove it against Ultralytics, measure it, and record the proven ones, fastest first, in the metadata (``runtimes``),
which the worker's ``runtime: auto`` follows (``handler/runtime/runtimes.py``).

Candidates (``--runtimes``; ``auto``: each one installed here):
  ``aoti``      ``backbone.pt2``: ``torch.export`` + AOTInductor with ``freezing`` (``export/aoti.py``); its entry
                records this CPU's ISA flags, which the compiled code needs (``-march=native``).
  ``openvino``  ``backbone.xml`` + ``.bin``: the IR of ``backbone.pt`` (``export/openvino_ir.py``), run in f32.
The traced ``backbone.pt`` is always in the list (the reference).

Proof of an FP32 candidate: its raw outputs within :data:`export.aoti.RAW_TOL` of ``backbone.pt``'s at two shapes, and
the served pipeline with it equal to ``YOLO.predict`` on each sample image (``export/verify.py`` ``check_predict``:
matched, IoU >= 0.99, |dscore| <= 0.005). A candidate that fails is left out, with its reason in the log; the export
goes on with the others. Reduced precision (``--quantize bf16`` / ``int8``) is never a candidate: it is the user's
choice, with its drift report (``export/quantize.py``).

Measurement: the raw forward of ``bus.jpg`` letterboxed as served, each runtime in chunks of calls that alternate
between runtimes, a pause between chunks (torch's OpenMP threads spin after a call and would slow the next engine),
at 1 thread pinned to one CPU and at the thread count a one-worker model gets here (``handler/runtime/cpu_budget.py``);
the p50 per runtime and thread count, the runtimes ordered by their sum.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from export.checkpoint import ExportError
from export.metadata import to_json
from export.verify import VerificationError
from handler.contract import (
    AOTI_BACKBONE_FILE,
    AOTI_FORMAT,
    AOTI_RUNTIME,
    OPENVINO_RUNTIME,
    RUNTIME_FILES,
    RUNTIMES_KEY,
    TORCHSCRIPT_RUNTIME,
)
from handler.image.decode import decode_image
from handler.pipeline import YoloPipeline
from handler.runtime import cpu_flags
from handler.runtime.cpu_budget import auto_threads
from handler.runtime.runtimes import RuntimeEntry, load_backbone

CANDIDATES = (AOTI_RUNTIME, OPENVINO_RUNTIME)
AUTO = "auto"
Log = Callable[[str], None]


def not_installed(runtime: str) -> str | None:
    """Why ``runtime`` cannot be built here (what to install), or None."""
    if runtime == OPENVINO_RUNTIME:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "openvino is not installed: pip install 'yolo-torchserve[openvino]'"
    if runtime == AOTI_RUNTIME and shutil.which("c++") is None and shutil.which("g++") is None:
        return "AOTInductor needs a C++ compiler (c++ or g++) on the export machine"
    return None


def resolve(requested: list[str], log: Log = print) -> list[str]:
    """``--runtimes`` -> the candidates to build: ``auto`` = each installed one (the others logged), ``torchscript``
    alone = none. Raises :class:`ExportError` for a named runtime that cannot be built here."""
    if requested == [AUTO]:
        out = []
        for runtime in CANDIDATES:
            why = not_installed(runtime)
            if why:
                log(f"  runtime {runtime}: not a candidate ({why})")
            else:
                out.append(runtime)
        return out
    for runtime in requested:
        why = not_installed(runtime) if runtime in CANDIDATES else None
        if why:
            raise ExportError(f"--runtimes {runtime}: {why}")
    return [r for r in dict.fromkeys(requested) if r in CANDIDATES]


def build(runtime: str, result, metadata_json: str) -> RuntimeEntry:
    """Write ``runtime``'s backbone file(s) into the export directory; returns its (unmeasured) entry."""
    out_dir: Path = result.out_dir
    h, w = result.metadata["imgsz"]
    if runtime == AOTI_RUNTIME:
        from export import aoti

        target = out_dir / AOTI_BACKBONE_FILE
        if not (result.metadata.get("format") == AOTI_FORMAT and target.is_file()):  # --format aoti compiled it already
            aoti.compile_package(aoti.export_program(result.loaded, (h, w)), target, metadata_json)
        return RuntimeEntry(AOTI_RUNTIME, files=(AOTI_BACKBONE_FILE,), cpu_flags=tuple(cpu_flags.isa_flags()))
    from export import openvino_ir

    openvino_ir.save(openvino_ir.convert(out_dir, (h, w)), out_dir, metadata_json)
    return RuntimeEntry(OPENVINO_RUNTIME, files=tuple(RUNTIME_FILES[OPENVINO_RUNTIME]))


def pipeline_with(reference: YoloPipeline, backbone) -> YoloPipeline:
    """``reference`` with another backbone (same postprocessor, metadata, imgsz, letterbox)."""
    r = reference
    return YoloPipeline(backbone, r.postprocess, r.metadata, imgsz=r.imgsz, letterbox_mode=r.letterbox_mode)


def load(entry: RuntimeEntry, out_dir: Path, threads: int) -> object:
    """``entry``'s backbone from ``out_dir`` on the CPU, at ``threads`` (OpenVINO takes its count at compile)."""
    from handler.runtime.artifacts import _jit_load

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return load_backbone(entry, out_dir, torch.device("cpu"), _jit_load)[0]
    finally:
        torch.set_num_threads(before)


def prove(loaded, reference: YoloPipeline, candidate: YoloPipeline, images: list[Path]) -> tuple[float, int]:
    """``candidate`` against ``backbone.pt`` (raw outputs) and against ``YOLO.predict`` (each image). Returns (raw max
    abs diff, detections matched); raises ``VerificationError``."""
    from export import aoti, verify

    h, w = reference.imgsz
    s = int(reference.metadata["max_stride"])
    shapes = [(1, h, w), (2, max(s, h // 2 // s * s), w)]
    raw = aoti.raw_output_diff(reference.backbone, candidate.backbone, shapes)
    if raw > aoti.RAW_TOL:
        raise VerificationError(f"raw outputs differ by {raw:.2e} > {aoti.RAW_TOL:.0e} from {RUNTIME_FILES[TORCHSCRIPT_RUNTIME][0]}")
    matched = sum(verify.check_predict(loaded, candidate, p) for p in images)
    return raw, matched


def measure(backbones: dict[str, object], x: torch.Tensor, threads: int, chunks: int = 4, calls: int = 5,
            pause_s: float = 0.3) -> dict[str, float]:
    """p50 ms of each backbone's forward on ``x``: ``chunks`` rounds, each runtime ``calls`` calls in a row per round,
    after 2 warm-up calls, a ``pause_s`` pause between chunks. torch runs at ``threads``; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {k: [] for k in backbones}
    try:
        with torch.inference_mode():
            for name, fn in backbones.items():
                for _ in range(2):
                    fn(x)
            for _ in range(chunks):
                for name, fn in backbones.items():
                    time.sleep(pause_s)
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        fn(x)
                        times[name].append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(before)
    return {k: statistics.median(v) for k, v in times.items()}


def thread_counts() -> list[int]:
    """The thread counts the export measures at: 1 (a worker of one thread, several per host) and what one worker
    gets here (``handler/runtime/cpu_budget.py``). The runtimes are ordered by the sum of their p50s: the ranking
    differs between them (docs/cpu-speed.md)."""
    return sorted({1, auto_threads(1).threads})


def measure_and_record(result, entries: dict[str, tuple[RuntimeEntry, object]], reference: YoloPipeline, log: Log,
                       first: str | None = None) -> list[RuntimeEntry]:
    """Time ``entries`` (``{label: (entry, backbone)}``) at each of :func:`thread_counts` (1 thread pinned to one CPU)
    and write them, fastest first (by the sum of their p50s; ``first``, a label: that one first whatever its speed), into
    the metadata of every file (``runtimes``); returns the entries in that order. Each runtime's backbone is loaded again
    per thread count (OpenVINO takes its thread count when it compiles)."""
    import os

    from export.quantize import rewrite_metadata

    out_dir: Path = result.out_dir
    image = decode_image(Path(_bus()).read_bytes())
    x = reference.to_input([reference.prepare(image).pixels])  # float32[1, 3, H, W] channels-last, as torch runtimes get it
    planar = x.contiguous()  # the same values, dense NCHW, as OpenVINO gets it (pipeline.planar_input)
    per_threads: dict[str, dict[str, float]] = {label: {} for label in entries}
    affinity = os.sched_getaffinity(0)
    for threads in thread_counts():
        backbones = {label: (backbone if threads == auto_threads(1).threads or entry.runtime != OPENVINO_RUNTIME
                             else load(entry, out_dir, threads)) for label, (entry, backbone) in entries.items()}
        calls = {label: (lambda t, b=b: b(planar if not getattr(b, "channels_last", True) else t)) for label, b in backbones.items()}
        if threads == 1:
            os.sched_setaffinity(0, {min(affinity)})
        try:
            ms = measure(calls, x, threads)
        finally:
            os.sched_setaffinity(0, affinity)
        for label, value in ms.items():
            per_threads[label][str(threads)] = round(value, 2)
    ordered = sorted((replace(e, forward_ms=tuple(per_threads[label].items())) for label, (e, _) in entries.items()),
                     key=lambda e: (e.label != first, sum(ms for _, ms in e.forward_ms)))
    h, w = x.shape[2:]
    log(f"  runtimes, raw forward p50 at 1x3x{h}x{w}, CPU {cpu_flags.summary()}: "
        + "; ".join(f"{e.label} {e.measured}" for e in ordered))
    log(f"  runtime auto will take {ordered[0].label} where it runs, then the next")
    meta = {**result.metadata, RUNTIMES_KEY: [e.as_dict() for e in ordered]}
    rewrite_metadata(out_dir, meta)
    result.metadata = meta
    return ordered


def _bus() -> Path:
    from export.exporter import sample_images

    return sample_images()[0]


def add_runtimes(result, runtimes: list[str], step, log: Log) -> list[RuntimeEntry]:
    """The runtime step for FP32 (module docstring), on an export whose TorchScript pair passed the Ultralytics checks.
    Returns the recorded entries, fastest first."""
    from export.exporter import sample_images

    out_dir: Path = result.out_dir
    threads = auto_threads(1).threads  # the backbones are checked at the count one worker gets here
    metadata_json = to_json(result.metadata)
    reference = YoloPipeline.from_dir(out_dir, runtime=TORCHSCRIPT_RUNTIME)
    entries: dict[str, tuple[RuntimeEntry, object]] = {
        TORCHSCRIPT_RUNTIME: (RuntimeEntry(TORCHSCRIPT_RUNTIME, files=tuple(RUNTIME_FILES[TORCHSCRIPT_RUNTIME])), reference.backbone)
    }
    images = sample_images()
    for runtime in runtimes:
        files = RUNTIME_FILES[runtime]
        try:
            with step(f"runtime {runtime}: build"):
                entry = build(runtime, result, metadata_json)
            with step(f"runtime {runtime}: check == backbone.pt, == YOLO.predict"):
                backbone = load(entry, out_dir, threads)
                raw, n = prove(result.loaded, reference, pipeline_with(reference, backbone), images)
        except Exception as e:  # noqa: BLE001 - a candidate that fails to build, load or match is left out, never the export
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log(f"    runtime {runtime} left out: {reason}")
            for name in files:
                if name != result.metadata["backbone"]:  # a --format aoti export keeps its (checked) backbone.pt2
                    (out_dir / name).unlink(missing_ok=True)
            continue
        log(f"    raw outputs max abs diff {raw:.2e}; {n} detections equal to YOLO.predict")
        entries[runtime] = (entry, backbone)
        result.files += [out_dir / name for name in entry.files if out_dir / name not in result.files]
    chosen = entries[AOTI_RUNTIME][0].label if result.metadata.get("format") == AOTI_FORMAT and AOTI_RUNTIME in entries else None
    with step("runtimes: measure"):  # --format aoti: the user chose the .pt2; it stays first
        return measure_and_record(result, entries, reference, log, first=chosen)
