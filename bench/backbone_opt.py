"""FP32 rewrites of the traced ``backbone.pt``, CPU only, as ``python -m bench.cpu_reference`` measures them.

None of them is served (``docs/cpu-speed.md`` says why); the worker runs the traced module as exported.

  ``none``     the traced module as exported (the default).
  ``freeze``   ``torch.jit.freeze``: weights and attributes become constants, so the graph passes fold
               them (conv + BN are already fused at export; what is left is constant propagation).
  ``optimize`` ``freeze`` then ``torch.jit.optimize_for_inference`` (conv/add/activation folding and
               oneDNN (MKL-DNN) layouts for the convolutions).
  ``onednn``   ``freeze`` run under oneDNN Graph fusion (LLGA, ``torch.jit.enable_onednn_fusion``): the profiling
               executor fuses conv + SiLU + add chains into oneDNN partitions, compiled per input shape.

The contract of the result is the backbone's (``export/backbone.py``): ``float32[B, 3, H, W]`` RGB 0..1
in, ``nl`` tensors ``[B, no, H / s_i, W / s_i]`` out; outputs equal the plain module's to float rounding.

Every option keeps TorchScript's profiling executor: the first calls at each new input shape are
profiling runs (slow) and the optimised plan comes after, so :func:`optimise_backbone` runs ``example``
(and :func:`warm_shapes` the rect shapes of one ``imgsz``) at load time, not at a user's first request.
The oneDNN fusion switch is scoped to the backbone's own calls (:class:`OneDnnFused`): the postprocessor
and any other TorchScript in the process keep the default fuser.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch
from torch import Tensor

BACKBONE_OPTS = ("none", "freeze", "optimize", "onednn")


class OneDnnFused:
    """A frozen backbone whose every call runs with oneDNN Graph fusion on (and off again after)."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module

    def __call__(self, x: Tensor) -> Any:
        # torch.jit.enable_onednn_fusion's switch, set for this call only (torch.jit.fuser("fuser3") also
        # flips the deprecated nvFuser switch, which logs a warning on every call)
        before = torch._C._jit_llga_enabled()
        torch._C._jit_set_llga_enabled(True)
        try:
            return self.module(x)
        finally:
            torch._C._jit_set_llga_enabled(before)

    def half(self) -> "OneDnnFused":
        raise ValueError("the onednn rewrite is an FP32 CPU option; use opt none with half precision")


def _frozen(backbone: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit.* deprecation notices in torch 2.14
        return torch.jit.freeze(backbone.eval())


def optimise_backbone(backbone: torch.jit.ScriptModule, opt: str, example: Tensor | None = None, runs: int = 3) -> Any:
    """The backbone rewritten by ``opt`` (one of :data:`BACKBONE_OPTS`), then called ``runs`` times on
    ``example`` (``float32[B, 3, H, W]``, channels-last as served) so its plan for that shape is built.

    Raises ``ValueError`` for an unknown ``opt`` or a backbone that is not TorchScript (the ``.pt2``)."""
    if opt not in BACKBONE_OPTS:
        raise ValueError(f"backbone rewrite must be one of {list(BACKBONE_OPTS)}, got {opt!r}")
    if opt == "none":
        return backbone
    if not isinstance(backbone, torch.jit.ScriptModule):
        raise ValueError(f"the {opt} rewrite applies to the TorchScript backbone.pt; this export serves "
                         f"{type(backbone).__name__}; use opt none")
    frozen = _frozen(backbone)
    if opt == "optimize":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            result: Any = torch.jit.optimize_for_inference(frozen)
    elif opt == "onednn":
        result = OneDnnFused(frozen)
    else:
        result = frozen
    if example is not None:
        warm_shapes(result, [tuple(example.shape)], runs)
    return result


def rect_shapes(imgsz: int, stride: int, batch: int = 1) -> list[tuple[int, int, int, int]]:
    """Every input shape the rect letterbox makes at a square ``imgsz``: ``[imgsz, k * stride]`` and
    ``[k * stride, imgsz]`` for ``k = 1 .. imgsz / stride`` (``imgsz`` a multiple of ``stride``)."""
    sides = range(stride, imgsz + 1, stride)
    shapes = [(batch, 3, imgsz, w) for w in sides] + [(batch, 3, h, imgsz) for h in sides if h != imgsz]
    return shapes


def warm_shapes(backbone: Any, shapes: Iterable[tuple[int, ...]], runs: int = 3) -> None:
    """Call ``backbone`` ``runs`` times at each shape (zeros, channels-last) under inference mode."""
    with torch.inference_mode():
        for shape in shapes:
            x = torch.zeros(shape).contiguous(memory_format=torch.channels_last)
            for _ in range(runs):
                backbone(x)
