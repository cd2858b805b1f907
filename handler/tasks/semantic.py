"""Semantic segmentation (``SemanticSegment`` head): one class per pixel.

Request parameters: ``classes`` (ids or names; every other class becomes 255, "ignore", as Ultralytics'
``classes=``) and ``encoding`` (``rle``, the default, or ``png``). Transform: the one letterbox.
Postprocessor: :class:`export.semantic.SemanticPostprocess` (inputs ``feats, geometry, class_mask``;
outputs ``class_map [B, H0, W0]``, ``sizes int64[B, 2]``, ``pixels int64[B, max(nc, 2)]``; contract in
``export/semantic.py``).

Results, ``"semantic"``::

    {"size": [H, W], "ignore": 255,
     "classes": [{"class_id": 0, "class_name": "road", "pixels": 81234,
                  "mask": {"size": [H, W], "counts": "<COCO RLE>"}}, ...]}   # each class present, by id

With ``encoding=png`` the classes carry no ``mask``; instead ``"png"`` holds one base64 PNG of the whole
class map (grey, 8-bit, 16-bit when a class id exceeds 255) and ``"bits"`` its depth. A model with one
class (``nc == 1``) maps it to pixel value 1 (0 is background), as Ultralytics' ``> 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from handler import request_values as p
from handler.contract import SEMANTIC_IGNORE
from handler.encoding.dense import b64, encode_class_map_png
from handler.encoding.masks import encode_rle
from handler.errors import InvalidParameter
from handler.response import ModelInfo
from handler.tasks.base import Letterboxed, PreparedImage

ENCODINGS = ("rle", "png")


@dataclass(frozen=True)
class SemanticOptions:
    """The postprocessor's per-request option: the classes to keep (None keeps all)."""

    classes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Encoding:
    """What a dense answer carries: ``rle`` masks per class, or one ``png`` (depth: ``png16`` or ``float32``)."""

    encoding: str


@dataclass
class ClassMap:
    """One image's class map on CPU: ``class_map[orig_h, orig_w]`` (uint8, or int16 above 256 classes) and
    ``pixels: int64[max(nc, 2)]`` per class value."""

    class_map: Tensor
    pixels: Tensor


def choice(name: str, value: Any, valid: tuple[str, ...]) -> str:
    value = p.text(name, value)
    if not isinstance(value, str) or value.lower() not in valid:
        raise InvalidParameter(f"{name} must be one of {list(valid)}, got {value!r}")
    return value.lower()


class SemanticTask(Letterboxed):
    name = "semantic"
    parameters = ("classes", "encoding")
    foreign = "do not apply to a semantic segmentation model"
    results_key = "semantic"

    def default_options(self, config: Any = None) -> SemanticOptions:
        return SemanticOptions()

    def options(self, params: dict[str, Any], defaults: SemanticOptions, names: Sequence[str]) -> tuple[SemanticOptions, Encoding]:
        classes = p.class_ids(params["classes"], names) if "classes" in params else defaults.classes
        if classes is not None:
            bad = [c for c in classes if not 0 <= c < len(names)]
            if bad:
                raise InvalidParameter(f"class ids {bad} out of range 0..{len(names) - 1}")
        encoding = choice("encoding", params["encoding"], ENCODINGS) if "encoding" in params else ENCODINGS[0]
        return SemanticOptions(classes), Encoding(encoding)

    def postprocess(self, module: Any, feats: list[Tensor], items: list[PreparedImage], nc: int) -> list[ClassMap]:
        geometry = torch.tensor([it.params.as_row() for it in items], dtype=torch.float32)  # [B, 6]
        class_mask = None
        if any(it.options.classes is not None for it in items):
            class_mask = torch.ones(len(items), nc, dtype=torch.bool)  # [B, nc]
            for row, it in enumerate(items):
                if it.options.classes is not None:
                    class_mask[row] = False
                    class_mask[row, list(it.options.classes)] = True
        maps, sizes, pixels = (t.cpu() for t in module(feats, geometry, class_mask))
        return [ClassMap(maps[b, : int(sizes[b, 0]), : int(sizes[b, 1])], pixels[b]) for b in range(len(items))]

    def to_json(self, output: ClassMap, info: ModelInfo, options: Encoding | None) -> dict:
        class_map = output.class_map.numpy()
        h, w = class_map.shape
        binary = len(info.names) == 1  # the map holds 0 (background) and 1 (the class)
        encoding = options.encoding if options is not None else ENCODINGS[0]
        classes = []
        for value, count in enumerate(output.pixels.tolist()):
            if count <= 0 or (binary and value == 0):
                continue
            class_id = 0 if binary else value
            entry = {"class_id": class_id, "class_name": info.names[class_id], "pixels": int(count)}
            if encoding == "rle":
                entry["mask"] = encode_rle((class_map == value).astype(np.uint8))
            classes.append(entry)
        body: dict = {"size": [int(h), int(w)], "ignore": SEMANTIC_IGNORE, "classes": classes}
        if encoding == "png":
            body["bits"] = 8 if class_map.dtype == np.uint8 else 16
            body["png"] = b64(encode_class_map_png(class_map))
        return body


SEMANTIC = SemanticTask()
