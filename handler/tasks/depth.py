"""Monocular depth (``Depth`` head): metres per pixel.

Request parameter: ``encoding`` (``png16``, the default, or ``float32``); detection parameters are a
400 for that request. Transform: :func:`handler.image.stretch.stretch`, ``DepthPredictor``'s ``scale_fill``
(stretched to ``imgsz``, no letterbox). Postprocessor: :class:`export.depth.DepthPostprocess` (inputs
``feats, geometry``; outputs ``depth float32[B, H0, W0]`` metres, ``sizes int64[B, 2]``,
``stats float32[B, 4]``; contract in ``export/depth.py``).

Results, ``"depth"``::

    {"size": [H, W], "unit": "m", "min": 0.27, "max": 148.1,
     "png16": "<base64 16-bit PNG>",          # value v means min + (max - min) * v / 65535
     "stats": {"min": .., "max": .., "mean": .., "median": ..}}

``min`` and ``max`` are the float32 values that decode the PNG, not rounded. With ``encoding=float32``,
``"float32"`` replaces ``"png16"``: the raw little-endian float32 map, row-major, base64; when it would
not fit the response limit the request gets 413 and a message that says to use ``png16``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from handler.encoding.dense import DenseTooLarge, b64, encode_depth_png16, encode_float32
from handler.errors import ResponseTooLarge
from handler.response import MAX_RESPONSE_BYTES, ModelInfo
from handler.tasks.base import PreparedImage, Stretched
from handler.tasks.semantic import Encoding, choice

ENCODINGS = ("png16", "float32")
# The response limit less what the rest of the body needs (a few hundred bytes; 64 KiB kept free).
MAX_FLOAT32_B64_CHARS = MAX_RESPONSE_BYTES - 64 * 2**10


@dataclass
class DepthMap:
    """One image's depth on CPU: ``depth: float32[orig_h, orig_w]`` metres and ``stats: float32[4]``
    (min, max, mean, median)."""

    depth: Tensor
    stats: Tensor


class DepthTask(Stretched):
    name = "depth"
    parameters = ("encoding",)
    foreign = "do not apply to a depth model"
    results_key = "depth"

    def default_options(self, config: Any = None) -> None:
        return None  # the postprocessor takes no per-request option

    def options(self, params: dict[str, Any], defaults: None, names: Sequence[str]) -> tuple[None, Encoding]:
        encoding = choice("encoding", params["encoding"], ENCODINGS) if "encoding" in params else ENCODINGS[0]
        return None, Encoding(encoding)

    def postprocess(self, module: Any, feats: list[Tensor], items: list[PreparedImage], nc: int) -> list[DepthMap]:
        geometry = torch.tensor([it.params.as_row() for it in items], dtype=torch.float32)  # [B, 6]
        depth, sizes, stats = (t.cpu() for t in module(feats, geometry))
        return [DepthMap(depth[b, : int(sizes[b, 0]), : int(sizes[b, 1])], stats[b]) for b in range(len(items))]

    def to_json(self, output: DepthMap, info: ModelInfo, options: Encoding | None) -> dict:
        depth = output.depth.numpy()
        h, w = depth.shape
        encoding = options.encoding if options is not None else ENCODINGS[0]
        png, lo, hi = encode_depth_png16(depth)
        body: dict = {"size": [int(h), int(w)], "unit": "m", "min": lo, "max": hi}
        if encoding == "png16":
            body["png16"] = b64(png)
        else:
            try:
                body["float32"] = b64(encode_float32(depth, MAX_FLOAT32_B64_CHARS))
            except DenseTooLarge as e:
                raise ResponseTooLarge(str(e)) from None
        s_min, s_max, s_mean, s_median = (float(v) for v in output.stats.tolist())
        body["stats"] = {"min": s_min, "max": s_max, "mean": s_mean, "median": s_median}
        return body


DEPTH = DepthTask()
