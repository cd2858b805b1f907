"""The AOTInductor runtime: loading ``backbone.pt2`` (written by ``python -m export --format aoti``, by the runtime
step of the export, or by ``--quantize int8`` with torchao).

``handler/runtime/runtimes.py`` calls :func:`load_aoti_backbone` for the ``aoti`` runtime; the result is called exactly
like the traced ``backbone.pt``: ``images: float32[B, 3, H, W]`` -> tuple of ``[B, no, H / stride_i, W / stride_i]``.

A ``.pt2`` is machine code for one device type and, on CPU, for the export machine's instruction set (Inductor
compiles with ``-march=native``): the export records the CPU's ISA flags (``handler/runtime/cpu_flags.py``) and the
loader refuses a CPU that lacks one, before the code is loaded, so that it fails with a message, not SIGILL. It runs
in fp32 (or the int8 of ``--quantize int8``). ``half`` is not available for it.

Threads: the compiled kernels use OpenMP with torch's thread count (``torch.set_num_threads``, set by the worker's
thread policy before the load).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from handler.contract import AOTI_BACKBONE_FILE, AOTI_METADATA_KEY, AOTI_RUNTIME  # noqa: F401 - AOTI_BACKBONE_FILE for callers
from handler.runtime import cpu_flags

AOTI_MAX_BATCH = 64  # the dynamic dimensions export/aoti.py compiles for: batch 1..64,
AOTI_MAX_SIDE = 2048  # H and W from max_stride to 2048 pixels (multiples of max_stride)
_AOTI_DEVICE_KEY = "AOTI_DEVICE_KEY"  # what AOTInductor itself records: "cpu" or "cuda"


class AotiBackbone:
    """A loaded ``backbone.pt2``, callable like the TorchScript backbone."""

    runtime = AOTI_RUNTIME

    def __init__(self, compiled, device: torch.device, precision: str = "fp32") -> None:
        self._compiled = compiled  # torch._inductor AOTICompiledModel
        self.device = device
        self.precision = precision

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        """``images: float32[B, 3, H, W]`` -> the raw head outputs. The compiled code reads its input with the
        channels-last strides it was exported with (a no-op for ``YoloPipeline.to_input``'s batches); AOTInductor
        does not check strides, so any other layout is converted here."""
        b, _, h, w = images.shape
        if b > AOTI_MAX_BATCH or max(h, w) > AOTI_MAX_SIDE:  # AOTInductor does not check; out of bounds is UB
            raise ValueError(
                f"input {b}x3x{h}x{w} is outside the AOTInductor backbone's bounds (batch <= {AOTI_MAX_BATCH}, "
                f"H and W <= {AOTI_MAX_SIDE}); lower imgsz or batchSize, or export with --format torchscript"
            )
        return tuple(self._compiled(images.contiguous(memory_format=torch.channels_last)))

    def eval(self) -> "AotiBackbone":
        return self

    def half(self) -> "AotiBackbone":
        raise ValueError(
            "half=True is not available with an AOTInductor backbone (it is compiled in fp32); "
            "set half: false, or export with --format torchscript"
        )


def check_cpu(path: Path, required: list[str] | None) -> None:
    """Raise ``ValueError`` when this CPU lacks an instruction-set flag of ``required`` (the export CPU's, recorded
    in the metadata's ``runtimes`` entry): the code would die with SIGILL on the first instruction it lacks."""
    lacking = cpu_flags.missing(required)
    if lacking:
        raise ValueError(
            f"{path.name} was compiled for a CPU with {' '.join(lacking)}, which this CPU lacks (it would crash with SIGILL); "
            "set `runtime: torchscript` (or openvino) in model-config.yaml, or export again on this machine type"
        )


def load_aoti_backbone(path: Path, device: torch.device, required_flags: list[str] | None = None,
                       precision: str = "fp32") -> tuple[AotiBackbone, dict]:
    """Load ``path`` for ``device``; returns the backbone and its embedded export metadata. ``required_flags``: the
    CPU flags the package's code needs (checked before it is loaded); ``precision``: what the metadata says it runs.

    Raises ``ValueError`` when the package has no metadata, was compiled for another device type, or needs an
    instruction-set extension this CPU lacks."""
    if device.type == "cpu":
        check_cpu(path, required_flags)
    import torch._inductor  # noqa: F401 - only AOTI users pay for importing Inductor

    index = device.index if device.type == "cuda" and device.index is not None else -1
    compiled = torch._inductor.aoti_load_package(str(path), device_index=index)
    meta = compiled.get_metadata()
    if AOTI_METADATA_KEY not in meta:
        raise ValueError(f"{path} has no embedded {AOTI_METADATA_KEY}; re-export it with `python -m export --format aoti`")
    built_for = meta.get(_AOTI_DEVICE_KEY, "cpu")
    if built_for != device.type:
        raise ValueError(
            f"{path} was compiled for {built_for} and cannot run on {device.type}; run `python -m export --format aoti` "
            f"on a machine with the {device.type} device it will be served on"
        )
    return AotiBackbone(compiled, device, precision), json.loads(meta[AOTI_METADATA_KEY])
