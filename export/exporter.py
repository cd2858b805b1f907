"""Checkpoint -> ``backbone.pt`` + ``postprocess.pt`` + ``metadata.json``, then the proof of equality."""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from export import verify
from export.backbone import trace_backbone
from export.checkpoint import ExportError, HeadChoice, LoadedModel
from export.metadata import build_metadata, to_json
from export.tasks import EXPORT_TASKS, export_task, load_model, raw_network, run_checks
from handler.contract import (
    AOTI_BACKBONE_FILE,
    AOTI_FORMAT,
    AOTI_RUNTIME,
    BACKBONE_FILE,
    DEFAULT_MODEL_VERSION,
    METADATA_FILE,
    POSTPROCESS_FILE,
    TORCHSCRIPT_FORMAT,
)
from handler.image.decode import decode_image
from handler.pipeline import YoloPipeline


@dataclass
class ExportResult:
    out_dir: Path
    files: list[Path]
    metadata: dict
    loaded: LoadedModel
    steps: list[tuple[str, float]] = field(default_factory=list)  # (what, seconds)


@contextmanager
def _step(steps: list[tuple[str, float]], what: str, log: Callable[[str], None]) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    steps.append((what, dt))
    log(f"  {what:<42s} {dt:7.2f} s")


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch 2.14 marks torch.jit.* deprecated with a FutureWarning on every call; we use it on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        yield


def script_postprocessor(loaded: LoadedModel) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of the task's postprocessor (``export/tasks.py``) for ``loaded``."""
    with _quiet_jit():
        return torch.jit.script(export_task(loaded).postprocessor(loaded))


def round_imgsz(imgsz: list[int], stride: int, log: Callable[[str], None]) -> list[int]:
    """``[h, w]`` rounded up to multiples of ``stride``, with a warning, as Ultralytics' check_imgsz."""
    rounded = [max(stride, math.ceil(v / stride) * stride) for v in imgsz]
    if rounded != imgsz:
        log(f"WARNING: --imgsz {imgsz} is not a multiple of the max stride {stride}; using {rounded}")
    return rounded


def sample_images() -> list[Path]:
    """``bus.jpg`` and ``zidane.jpg`` from the installed ultralytics package."""
    from ultralytics.utils import ASSETS

    return [Path(ASSETS) / "bus.jpg", Path(ASSETS) / "zidane.jpg"]


def export_model(
    weights: str,
    out_dir: Path,
    imgsz: list[int] | None,
    name: str = "yolo",
    head: HeadChoice = "auto",
    letterbox: str = "rect",
    check: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = print,
    backbone_format: str = TORCHSCRIPT_FORMAT,
    version: str = DEFAULT_MODEL_VERSION,
    runtimes: list[str] | None = None,
) -> ExportResult:
    """``backbone_format="aoti"`` also compiles ``backbone.pt2`` (``export/aoti.py``) and names it in the
    metadata, so that the handler serves it; ``backbone.pt`` is still written, as the reference.

    ``runtimes`` (``aoti``, ``openvino``; see ``export/runtimes.py``): also build those backbone runtimes, prove each
    against Ultralytics, measure them and record the proven ones, fastest first (``runtime: auto`` in the worker).
    They need the checks (``check``) and a task of the detection family; otherwise they are skipped with a line."""
    steps: list[tuple[str, float]] = []
    with _step(steps, f"load {weights}", log):
        loaded = load_model(weights, head=head, seed=seed)
    if backbone_format == AOTI_FORMAT and not export_task(loaded).aoti:
        names = [name for name, t in EXPORT_TASKS.items() if t.aoti]
        supported = ", ".join(names[:-1]) + " and " + names[-1]
        raise ExportError(f"{weights}: --format aoti serves {supported} models; export {loaded.task} models as torchscript")
    if imgsz is None:  # what YOLO(weights).predict() uses: the checkpoint's training size, else 640
        default = loaded.predict_imgsz
        imgsz = [default, default] if isinstance(default, int) else list(default)
    imgsz = round_imgsz(imgsz, loaded.max_stride, log)
    log(
        f"  task={loaded.task} head={loaded.head_type} nc={loaded.nc} reg_max={loaded.reg_max} "
        f"end2end={loaded.end2end} kpt_shape={loaded.kpt_shape} strides={loaded.strides}"
    )
    metadata = build_metadata(loaded, name, imgsz, letterbox, backbone_format, version)
    extra = {METADATA_FILE: to_json(metadata)}
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone_path, post_path, meta_path = out_dir / BACKBONE_FILE, out_dir / POSTPROCESS_FILE, out_dir / METADATA_FILE

    with _step(steps, f"trace backbone at 1x3x{imgsz[0]}x{imgsz[1]}", log), _quiet_jit():
        traced = trace_backbone(raw_network(loaded), (imgsz[0], imgsz[1]))
        torch.jit.save(traced, str(backbone_path), _extra_files=extra)
    with _step(steps, "script postprocessor", log), _quiet_jit():
        torch.jit.save(script_postprocessor(loaded), str(post_path), _extra_files=extra)
    meta_path.write_text(to_json(metadata) + "\n")
    result = ExportResult(out_dir, [backbone_path, post_path, meta_path], metadata, loaded, steps)
    if backbone_format == AOTI_FORMAT:
        from export import aoti

        with _step(steps, "torch.export backbone (dynamic batch, H, W)", log):
            program = aoti.export_program(loaded, (imgsz[0], imgsz[1]))
        with _step(steps, "AOTInductor compile + package", log):
            result.files.append(aoti.compile_package(program, out_dir / AOTI_BACKBONE_FILE, extra[METADATA_FILE]))
    if check:
        verify_export(result, log)
    if backbone_format == AOTI_FORMAT and check:  # its entry records the ISA the .pt2 needs (the worker's guard)
        runtimes = [AOTI_RUNTIME, *[r for r in runtimes or () if r != AOTI_RUNTIME]]
    if runtimes:
        if not check:
            log("  runtimes: skipped (they are proven by the checks, which --no-check turns off)")
        elif not export_task(loaded).aoti:
            log(f"  runtimes: skipped ({loaded.task} models are served by backbone.pt)")
        else:
            from export.runtimes import add_runtimes

            add_runtimes(result, runtimes, lambda what: _step(steps, what, log), log)
    return result


def verify_export(result: ExportResult, log: Callable[[str], None] = print) -> None:
    """Run the three checks of ``export/verify.py`` on the files just written: the trace, then the task's own
    (``export/tasks.py`` ``run_checks``)."""
    loaded, steps = result.loaded, result.steps
    pipeline = YoloPipeline.from_dir(result.out_dir)
    compiled = None
    if pipeline.metadata.get("format") == AOTI_FORMAT:  # Ultralytics checks on backbone.pt, then .pt2 == .pt
        from export import aoti

        compiled, pipeline = pipeline, aoti.torchscript_pipeline(pipeline, result.out_dir)
    h, w = pipeline.imgsz
    stride = loaded.max_stride
    shapes = [(1, h, w), (2, max(stride, h // 2 // stride * stride), w)]
    with _step(steps, f"check trace == eager at {shapes}", log):
        diff = verify.check_trace(raw_network(loaded), pipeline.backbone, shapes)
    log(f"    max abs diff {diff:.2e}")
    images = sample_images()
    run_checks(loaded, pipeline, images, lambda what: _step(steps, what, log), log)
    if compiled is not None:
        with _step(steps, f"check {AOTI_BACKBONE_FILE} == {BACKBONE_FILE} at {shapes}", log):
            raw, det = aoti.check_parity(pipeline, compiled, [decode_image(p.read_bytes()) for p in images], shapes)
        log(f"    raw outputs max abs diff {raw:.2e}; detections identical (max abs diff {det:.2e})")
