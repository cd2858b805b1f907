"""``python -m export --format aoti``: the backbone through ``torch.export`` + AOTInductor into ``backbone.pt2``.

Contract of ``backbone.pt2`` (the same as the traced ``backbone.pt``, see ``export/backbone.py``):
  input   ``images: float32[B, 3, H, W]``, RGB, 0..1, with dynamic ``B`` in ``1..AOTI_MAX_BATCH`` and
          dynamic ``H``, ``W`` that are multiples of ``max_stride`` in ``max_stride..AOTI_MAX_SIDE``;
          compiled for channels-last strides (the loader converts a contiguous tensor).
  output  tuple of ``nl`` tensors ``[B, no, H / stride_i, W / stride_i]``.

The package holds machine code for the CPU it was compiled on (the x86 ISA level Inductor picked,
for example AVX2/AVX-512), or for the GPU architecture when compiled on CUDA: build it where it runs.
It carries the export metadata in its AOTInductor metadata under ``metadata.json``.

The postprocessor stays the scripted ``postprocess.pt``: its NMS is a data-dependent loop (the number
of kept boxes decides the next iteration) over per-image thresholds, which ``torch.export`` cannot
trace without rewriting it around unbacked symbolic sizes; Inductor would gain nothing on it either
(it takes ~4 ms of the ~70 ms per image on CPU).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from export.backbone import RawHead
from export.checkpoint import LoadedModel
from export.verify import VerificationError
from handler.contract import BACKBONE_FILE
from handler.pipeline import YoloPipeline
from handler.runtime.aoti import AOTI_MAX_BATCH, AOTI_MAX_SIDE, AOTI_METADATA_KEY

RAW_TOL = 5e-4  # Inductor fuses and reorders differently: raw outputs agree to ~1e-4, not bit for bit
# "identical detections": same count, classes and order; boxes and keypoints (pixels) and scores within
# 1e-2, the response's pixel precision (measured on bus.jpg / zidane.jpg: about 1e-4 px)
DETECTION_TOL = 1e-2


def export_program(loaded: LoadedModel, example_hw: tuple[int, int]) -> torch.export.ExportedProgram:
    """``torch.export`` of :class:`RawHead` with dynamic batch, height and width.

    The example batch is 2: with 1, ``torch.export`` specialises the batch dimension to a constant.
    H and W are ``max_stride * k`` so that every level's size stays an integer function of them.
    The example is channels-last, the layout ``YoloPipeline.to_input`` produces: the compiled code
    assumes the example's strides (``AotiBackbone`` converts other layouts before the call).
    """
    s = loaded.max_stride
    batch = torch.export.Dim("batch", min=1, max=AOTI_MAX_BATCH)
    h_cells = torch.export.Dim("h_cells", min=1, max=AOTI_MAX_SIDE // s)
    w_cells = torch.export.Dim("w_cells", min=1, max=AOTI_MAX_SIDE // s)
    example = torch.rand(2, 3, *example_hw).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        return torch.export.export(
            RawHead(loaded).eval(),
            (example,),
            dynamic_shapes={"x": {0: batch, 2: s * h_cells, 3: s * w_cells}},
        )


def compile_package(program: torch.export.ExportedProgram, path: Path, metadata_json: str) -> Path:
    """AOTInductor-compile ``program`` into the ``.pt2`` at ``path``, with ``metadata_json`` embedded.

    With ``freezing`` (the weights become constants: oneDNN weight prepacking, conv + unary fusion), which the
    AOTInductor docs recommend on CPU: 0.84x TorchScript's forward against 0.92x without it (docs/cpu-speed.md). It
    runs under ``no_grad``: under autograd the freezing passes keep the unfused graph."""
    path.unlink(missing_ok=True)
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=str(path),
            inductor_configs={"aot_inductor.metadata": {AOTI_METADATA_KEY: metadata_json}, "freezing": True},
        )
    return path


def raw_output_diff(reference, candidate, shapes: list[tuple[int, int, int]]) -> float:
    """Max abs difference of two backbones' raw outputs at each ``(B, H, W)`` of ``shapes``.

    Raises ``ValueError`` on a shape mismatch."""
    worst = 0.0
    for b, h, w in shapes:
        x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(h * w + b))
        with torch.inference_mode():
            outs: list[Tensor] = [*zip(reference(x), candidate(x))]
        for lvl, (r, c) in enumerate(outs):
            if r.shape != c.shape:
                raise ValueError(f"level {lvl} at {b}x3x{h}x{w}: shape {tuple(c.shape)} != {tuple(r.shape)}")
            worst = max(worst, float((r - c).abs().max()))
    return worst


def torchscript_pipeline(aoti_pipeline: YoloPipeline, export_dir: Path) -> YoloPipeline:
    """The same export served with the traced ``backbone.pt`` that ``--format aoti`` also writes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit.* deprecation notices in torch 2.14
        backbone = torch.jit.load(str(export_dir / BACKBONE_FILE), map_location="cpu").eval()
    p = aoti_pipeline
    return YoloPipeline(backbone, p.postprocess, p.metadata, imgsz=p.imgsz, letterbox_mode=p.letterbox_mode)


def detection_diff(reference: Tensor, candidate: Tensor) -> float:
    """Max abs difference of two detection lists (postprocessor rows of one image); ``inf`` when their
    count or class ids differ."""
    if reference.shape != candidate.shape or not torch.equal(reference[:, 5], candidate[:, 5]):
        return float("inf")
    return float((reference - candidate).abs().max()) if len(reference) else 0.0


def check_parity(
    reference: YoloPipeline, candidate: YoloPipeline, images: list[np.ndarray], shapes: list[tuple[int, int, int]]
) -> tuple[float, float]:
    """``candidate`` (the ``.pt2``) against ``reference`` (``backbone.pt``), same postprocessor.

    Raw outputs within :data:`RAW_TOL` at each ``(B, H, W)``; on each image the same detections: same
    count, same classes in the same order, boxes, scores and keypoints within :data:`DETECTION_TOL`.
    Returns (raw max abs diff, detection max abs diff); raises ``VerificationError``."""
    raw = raw_output_diff(reference.backbone, candidate.backbone, shapes)
    if raw > RAW_TOL:
        raise VerificationError(f"AOTInductor check: raw outputs differ by {raw:.2e} > {RAW_TOL:.0e} from backbone.pt")
    worst = 0.0
    for i, image in enumerate(images):
        ref = reference.infer([reference.prepare(image)])[0][0].rows
        got = candidate.infer([candidate.prepare(image)])[0][0].rows
        d = detection_diff(ref, got)
        if d > DETECTION_TOL:
            raise VerificationError(
                f"AOTInductor check: image {i}: {len(got)} detections (classes {got[:, 5].int().tolist()}) vs "
                f"backbone.pt's {len(ref)} ({ref[:, 5].int().tolist()}), max abs diff {d:.2e} > {DETECTION_TOL:.0e}"
            )
        worst = max(worst, d)
    return raw, worst
