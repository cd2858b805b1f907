"""``python -m export --quantize int8|bf16 --calib DIR``: a reduced-precision backbone, opt-in, with its drift measured.

Three flows, each ending in the same drift report and refusal (below), each recording its runtime first in the
metadata's ``runtimes`` (then the FP32 ``backbone.pt``), so that ``runtime: auto`` serves it:
- ``--quantize bf16``: the OpenVINO IR of ``backbone.pt`` (``export/openvino_ir.py``) compiled with the ``bf16``
  precision hint. Refused at once on a CPU without BF16 (``avx512_bf16`` or ``amx_bf16``).
- ``--quantize int8`` (``--int8-engine openvino``, the default: the faster, docs/cpu-speed.md): NNCF post-training
  quantisation of that IR on the calibration images.
- ``--quantize int8 --int8-engine torchao``: the flow below, into an AOTInductor ``backbone.pt2``.

The flow (torchao's PT2E, torch 2.14 has no ``torch.ao.quantization``):
  ``torch.export`` of the backbone (dynamic batch, H, W; ``export/aoti.py``) -> ``prepare_pt2e`` with the
  ``X86InductorQuantizer`` (static, per-tensor uint8 activations, per-channel int8 weights) -> the
  calibration images, letterboxed as served, through the observers -> ``convert_pt2e`` -> ``torch.export``
  again -> AOTInductor with ``freezing`` (the pass that turns quantize/dequantize + conv into oneDNN int8
  convolutions) into ``backbone.pt2``.

Contract of the INT8 ``backbone.pt2``: the FP32 backbone's (``float32[B, 3, H, W]`` RGB 0..1 in, ``nl`` float32
maps out); only the inside is quantised. The postprocessor stays the FP32 ``postprocess.pt``.
The metadata (in all three files) gets ``"precision": "int8"``, ``"format": "aoti"``; ``backbone.pt`` (FP32)
stays beside it as the reference.

Drift: the FP32 pair and the INT8 pair run on the calibration images and on held-out images (the export's
sample images not among them). A detection of the FP32 pair is matched when the INT8 pair has one of the same
class at IoU >= :data:`MATCH_IOU`; recall = matched / FP32 detections; dscore = |score difference| of the
matches. Below :data:`MIN_RECALL` on either set, the export is refused (:class:`Int8DriftError`), unless
``accept_drift``.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from export.checkpoint import ExportError, LoadedModel
from export.matching import greedy_match
from handler.contract import (
    AOTI_BACKBONE_FILE,
    AOTI_FORMAT,
    AOTI_METADATA_KEY,
    AOTI_RUNTIME,
    BACKBONE_FILE,
    METADATA_FILE,
    OPENVINO_RUNTIME,
    POSTPROCESS_FILE,
    RUNTIME_FILES,
    TORCHSCRIPT_RUNTIME,
)
from handler.image.decode import ImageDecodeError, decode_image
from handler.pipeline import YoloPipeline
from handler.runtime import cpu_flags
from handler.runtime.runtimes import RuntimeEntry

MATCH_IOU = 0.9
MIN_RECALL = 0.95
INT8 = "int8"
BF16 = "bf16"
MAX_CALIB_IMAGES = 64  # observers settle within tens of images; more only lengthens the export


class Int8DriftError(Exception):
    """Reduced precision (INT8 or BF16) moves the detections more than allowed; the CLI prints it on one line (exit 1)."""


@dataclass(frozen=True)
class CalibrationSet:
    images: list[np.ndarray]  # uint8[H, W, 3] BGR
    names: list[str]  # file names, same order
    skipped: int  # files that did not decode


def calibration_images(calib: Path | None, limit: int = MAX_CALIB_IMAGES) -> CalibrationSet:
    """The decodable images of ``calib`` (sorted by name, at most ``limit``); files that do not decode are
    skipped and counted. Raises :class:`ExportError` (exit 2) without a folder or without a readable image."""
    if calib is None:
        raise ExportError("--quantize needs --calib DIR, a folder of images like the ones it will serve")
    if not calib.is_dir():
        raise ExportError(f"--calib {calib}: not a folder; give a folder of calibration images")
    images, names, skipped = [], [], 0
    for path in sorted(p for p in calib.iterdir() if p.is_file()):
        if len(images) >= limit:
            break
        try:
            images.append(decode_image(path.read_bytes()))
            names.append(path.name)
        except (ImageDecodeError, OSError):
            skipped += 1
    if not images:
        raise ExportError(f"--calib {calib}: no readable image ({skipped} file(s) did not decode); give JPEG/PNG images")
    return CalibrationSet(images, names, skipped)


def _quantizer():
    """``X86InductorQuantizer`` without the conv + add (residual) fusion.

    Inductor fuses an annotated conv + add into an in-place oneDNN ``qconv2d_pointwise.binary`` that writes into
    the add's other input; in the C2f / C3k2 bottlenecks that input is a view of a ``chunk``, and the lowering
    refuses it ("QConv Binary Inplace Fusion requires accum is not an alias or mutation", torch 2.14.1 +
    torchao 0.18). Without the annotation, the residual add runs on the dequantised FP32 values."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    class NoResidualFusion(xiq.X86InductorQuantizer):
        def _annotate_conv2d_binary(self, gm, quantization_config, filter_fn=None) -> None:
            return None

        def _annotate_conv2d_binary_unary(self, gm, quantization_config, filter_fn=None) -> None:
            return None

    return NoResidualFusion()


def quantized_program(loaded: LoadedModel, fp32: YoloPipeline, calib: list[np.ndarray]) -> torch.export.ExportedProgram:
    """The backbone quantised by PT2E + ``X86InductorQuantizer``, calibrated on ``calib`` letterboxed as
    ``fp32`` serves them, exported again with dynamic batch, H and W."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from export.backbone import RawHead
    from handler.runtime.aoti import AOTI_MAX_BATCH, AOTI_MAX_SIDE

    h, w = fp32.imgsz
    s = loaded.max_stride
    batch = torch.export.Dim("batch", min=1, max=AOTI_MAX_BATCH)
    hc = torch.export.Dim("h_cells", min=1, max=AOTI_MAX_SIDE // s)
    wc = torch.export.Dim("w_cells", min=1, max=AOTI_MAX_SIDE // s)
    dynamic = ({0: batch, 2: s * hc, 3: s * wc},)
    example = torch.rand(2, 3, h, w).contiguous(memory_format=torch.channels_last)  # batch 2: see export/aoti.py
    quantizer = _quantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        # strict (Dynamo) export: the quantizer finds conv + add / conv + SiLU by their source module, and the
        # non-strict export of export/aoti.py groups ~90 convolutions into one source partition, which it refuses
        # ("Input partition has more than one output node")
        program = torch.export.export(RawHead(loaded).eval(), (example,), dynamic_shapes=dynamic, strict=True)
        prepared = prepare_pt2e(program.module(), quantizer)
        for image in calib:
            prepared(fp32.to_input([fp32.prepare(image).pixels]))  # float32[1, 3, h', w'] channels-last
        converted = convert_pt2e(prepared)
        return torch.export.export(converted, (example,), dynamic_shapes=dynamic)


def compile_int8(program: torch.export.ExportedProgram, path: Path, metadata_json: str) -> Path:
    """AOTInductor with freezing (the int8 convolution fusion passes run in it) into ``path``."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401 - registers the int8 fusion passes

    path.unlink(missing_ok=True)
    with torch.no_grad():  # under autograd the freezing passes leave fp32 convolutions on dequantised weights
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=str(path),
            inductor_configs={"aot_inductor.metadata": {AOTI_METADATA_KEY: metadata_json}, "freezing": True},
        )
    return path


@dataclass(frozen=True)
class Drift:
    """How far reduced precision (INT8, BF16) moves one set of images' detections from FP32's."""

    images: int
    fp32_detections: int
    int8_detections: int  # the reduced-precision detections
    matched: int  # FP32 detections with a reduced-precision one of the same class at IoU >= MATCH_IOU
    dscore_mean: float  # |score difference| over the matches
    dscore_max: float
    precision: str = INT8

    @property
    def recall(self) -> float:
        return self.matched / self.fp32_detections if self.fp32_detections else 1.0

    def line(self, what: str) -> str:
        return (f"{what}: {self.images} image(s), {self.fp32_detections} FP32 / {self.int8_detections} {self.precision.upper()} detections, "
                f"recall {self.recall:.3f} at IoU>={MATCH_IOU}, dscore mean {self.dscore_mean:.4f} max {self.dscore_max:.4f}")


def match(reference: Tensor, candidate: Tensor, iou: float = MATCH_IOU) -> list[tuple[int, int]]:
    """(reference index, candidate index) pairs of two detection lists (rows ``[N, >=6]`` on CPU), matched as
    :func:`export.matching.greedy_match` matches them at IoU >= ``iou``."""
    return [(r, c) for r, c, _ in greedy_match(reference.numpy(), candidate.numpy(), iou)]


def drift(fp32: YoloPipeline, int8: YoloPipeline, images: list[np.ndarray], precision: str = INT8) -> Drift:
    n_ref = n_got = n_match = 0
    dscores: list[float] = []
    for image in images:
        ref = fp32.infer([fp32.prepare(image)])[0][0].rows
        got = int8.infer([int8.prepare(image)])[0][0].rows
        pairs = match(ref, got)
        n_ref, n_got, n_match = n_ref + len(ref), n_got + len(got), n_match + len(pairs)
        dscores += [abs(float(ref[r, 4] - got[c, 4])) for r, c in pairs]
    return Drift(len(images), n_ref, n_got, n_match,
                 float(np.mean(dscores)) if dscores else 0.0, float(np.max(dscores)) if dscores else 0.0, precision)


def refuse_drift(drifts: list[Drift], accept_drift: bool) -> None:
    """Raise :class:`Int8DriftError` (one line) when any set's recall is below :data:`MIN_RECALL`, unless ``accept_drift``."""
    worst = min(d.recall for d in drifts)
    if worst < MIN_RECALL and not accept_drift:
        raise Int8DriftError(f"{drifts[0].precision.upper()} keeps {worst:.3f} of the FP32 detections (< {MIN_RECALL} at "
                             f"IoU>={MATCH_IOU}); refused: calibrate on more images like the served ones, or pass --accept-drift")


def int8_metadata(metadata: dict) -> dict:
    return {**metadata, "format": AOTI_FORMAT, "backbone": AOTI_BACKBONE_FILE, "precision": INT8}


def rewrite_metadata(out_dir: Path, metadata: dict) -> str:
    """Embed ``metadata`` in ``backbone.pt`` and ``postprocess.pt`` (the handler requires the files to agree)
    and write ``metadata.json``; returns the JSON."""
    import json

    text = json.dumps(metadata, indent=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        for name in (BACKBONE_FILE, POSTPROCESS_FILE):
            module = torch.jit.load(str(out_dir / name), map_location="cpu")
            torch.jit.save(module, str(out_dir / name), _extra_files={METADATA_FILE: text})
    (out_dir / METADATA_FILE).write_text(text + "\n")
    return text


@dataclass(frozen=True)
class Int8Result:
    """What a reduced-precision export wrote (INT8 or BF16) and its drift."""

    path: Path
    calibration: Drift
    held_out: Drift
    skipped: int
    export: Any = None  # the export.exporter.ExportResult, its files and metadata updated (backbone.pt2 added)


def quantize_export(result, calib: CalibrationSet, held_out: list[np.ndarray], accept_drift: bool = False,
                    log: Callable[[str], None] = print) -> Int8Result:
    """Turn the FP32 TorchScript export ``result`` (``export.exporter.ExportResult``) into an INT8 ``--format aoti``
    export in place. Raises :class:`Int8DriftError` when the recall on either set is below :data:`MIN_RECALL`
    and not ``accept_drift`` (the export directory then keeps the FP32 files, unchanged)."""
    from handler.runtime.aoti import load_aoti_backbone

    out_dir: Path = result.out_dir
    fp32 = YoloPipeline.from_dir(out_dir)
    if calib.skipped:
        log(f"  calibration: {calib.skipped} file(s) did not decode, skipped")
    log(f"  calibration: {len(calib.images)} image(s)")
    program = quantized_program(result.loaded, fp32, calib.images)
    meta = int8_metadata(result.metadata)
    import json

    staged = out_dir / ".int8" / AOTI_BACKBONE_FILE  # compiled beside, moved in once the drift is accepted
    staged.parent.mkdir(exist_ok=True)
    compile_int8(program, staged, json.dumps(meta, indent=2))
    backbone, _ = load_aoti_backbone(staged, torch.device("cpu"))
    int8 = YoloPipeline(backbone, fp32.postprocess, fp32.metadata, imgsz=fp32.imgsz, letterbox_mode=fp32.letterbox_mode)
    on_calib, on_held = drift(fp32, int8, calib.images), drift(fp32, int8, held_out)
    log("  " + on_calib.line("INT8 drift, calibration"))
    log("  " + on_held.line("INT8 drift, held-out"))
    try:
        refuse_drift([on_calib, on_held], accept_drift)
    except Int8DriftError:
        shutil.rmtree(staged.parent, ignore_errors=True)
        raise
    final = staged.replace(out_dir / AOTI_BACKBONE_FILE)
    shutil.rmtree(staged.parent, ignore_errors=True)
    result.metadata = meta
    entry = RuntimeEntry(AOTI_RUNTIME, INT8, (AOTI_BACKBONE_FILE,), cpu_flags=tuple(cpu_flags.isa_flags()))
    record_reduced(result, entry, int8.backbone, fp32, log)
    result.files.append(final)
    return Int8Result(final, on_calib, on_held, calib.skipped, result)


def record_reduced(result, entry: RuntimeEntry, backbone, fp32: YoloPipeline, log: Callable[[str], None]) -> None:
    """Measure the reduced-precision runtime beside the FP32 ``backbone.pt`` and write both into the metadata, the
    reduced one first (the user asked for it; ``runtime: auto`` serves it where it runs)."""
    from export.runtimes import measure_and_record

    reference = RuntimeEntry(TORCHSCRIPT_RUNTIME, files=tuple(RUNTIME_FILES[TORCHSCRIPT_RUNTIME]))
    measure_and_record(result, {entry.label: (entry, backbone), reference.label: (reference, fp32.backbone)}, fp32, log,
                       first=entry.label)


def check_bf16_cpu() -> None:
    """Raise :class:`ExportError` on a CPU without BF16: OpenVINO would run in f32 and nothing would be gained."""
    if not cpu_flags.has_bf16():
        raise ExportError(f"--quantize bf16 needs a CPU with BF16 ({' or '.join(cpu_flags.BF16_FLAGS)}); this CPU has "
                          f"{cpu_flags.summary()}: export and serve on such a CPU, or serve FP32 (without --quantize)")


def openvino_reduced(result, precision: str, calib: CalibrationSet, held_out: list[np.ndarray], accept_drift: bool = False,
                     log: Callable[[str], None] = print) -> Int8Result:
    """Turn the FP32 export ``result`` into a ``precision`` (bf16 or int8) OpenVINO export in place: the IR (NNCF-
    quantised for int8), its drift against ``backbone.pt``, the refusal below :data:`MIN_RECALL` (the IR is removed,
    the FP32 files stay as they were), then the runtimes recorded with it first."""
    from export import openvino_ir
    from export.metadata import to_json
    from export.runtimes import load, pipeline_with
    from handler.runtime.cpu_budget import auto_threads

    out_dir: Path = result.out_dir
    fp32 = YoloPipeline.from_dir(out_dir, runtime=TORCHSCRIPT_RUNTIME)
    if calib.skipped:
        log(f"  calibration: {calib.skipped} file(s) did not decode, skipped")
    log(f"  calibration: {len(calib.images)} image(s)")
    meta = {**result.metadata, "precision": precision}
    model = openvino_ir.convert(out_dir, tuple(fp32.imgsz))
    if precision == INT8:
        inputs = [fp32.to_input([fp32.prepare(image).pixels]).contiguous().numpy() for image in calib.images]
        model = openvino_ir.quantize_int8(model, inputs)
    xml = openvino_ir.save(model, out_dir, to_json(meta))
    entry = RuntimeEntry(OPENVINO_RUNTIME, precision, tuple(RUNTIME_FILES[OPENVINO_RUNTIME]))
    reduced = pipeline_with(fp32, load(entry, out_dir, auto_threads(1).threads))
    on_calib, on_held = drift(fp32, reduced, calib.images, precision), drift(fp32, reduced, held_out, precision)
    log("  " + on_calib.line(f"{precision.upper()} drift, calibration"))
    log("  " + on_held.line(f"{precision.upper()} drift, held-out"))
    try:
        refuse_drift([on_calib, on_held], accept_drift)
    except Int8DriftError:
        for name in entry.files:
            (out_dir / name).unlink(missing_ok=True)
        raise
    result.metadata = meta
    record_reduced(result, entry, reduced.backbone, fp32, log)
    result.files += [out_dir / name for name in entry.files]
    return Int8Result(xml, on_calib, on_held, calib.skipped, result)


def export_reduced(precision: str, engine: str, weights: str, out_dir: Path, calib_dir: Path | None, imgsz: list[int] | None,
                   accept_drift: bool = False, log: Callable[[str], None] = print, **export_kwargs) -> Int8Result:
    """``python -m export --quantize bf16|int8 [--int8-engine ENGINE] --calib DIR``: the FP32 export (checked against
    Ultralytics), then its reduced-precision backbone. The CPU and the calibration folder are checked first."""
    from export.exporter import export_model, sample_images

    if precision == BF16:
        check_bf16_cpu()
    if precision == INT8 and engine == "torchao":
        return export_int8(weights, out_dir, calib_dir, imgsz, accept_drift, log, **export_kwargs)
    from importlib.util import find_spec

    from export.runtimes import not_installed

    missing = not_installed(OPENVINO_RUNTIME)
    if missing is None and precision == INT8 and find_spec("nncf") is None:
        missing = "nncf is not installed: pip install 'yolo-torchserve[int8]'"
    if missing:
        raise ExportError(f"--quantize {precision}: {missing}")
    calib = calibration_images(calib_dir)
    result = export_model(weights, out_dir, imgsz, log=log, **export_kwargs)
    held_out = [decode_image(p.read_bytes()) for p in sample_images() if p.name not in calib.names]
    return openvino_reduced(result, precision, calib, held_out, accept_drift, log)


def export_int8(weights: str, out_dir: Path, calib_dir: Path | None, imgsz: list[int] | None, accept_drift: bool = False,
                log: Callable[[str], None] = print, **export_kwargs) -> Int8Result:
    """``python -m export --quantize int8 --calib DIR``: the FP32 export (checked against Ultralytics), then
    its backbone quantised in place. The calibration folder is read first, so a bad ``--calib`` fails at once."""
    from export.exporter import export_model, sample_images

    calib = calibration_images(calib_dir)
    result = export_model(weights, out_dir, imgsz, log=log, **export_kwargs)
    held_out = [decode_image(p.read_bytes()) for p in sample_images() if p.name not in calib.names]
    return quantize_export(result, calib, held_out, accept_drift, log)
