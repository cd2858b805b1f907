"""The client's pictures of semantic and depth answers (tools/dense_drawing.py), on synthetic answers."""

from __future__ import annotations

import base64

import numpy as np

from handler.encoding.dense import encode_class_map_png, encode_depth_png16
from handler.encoding.masks import encode_rle
from tools.dense_drawing import class_color, draw_depth, draw_semantic, semantic_class_map


def _semantic(encoding: str) -> tuple[np.ndarray, dict]:
    cmap = np.full((120, 160), 2, np.uint8)
    cmap[:, 100:] = 7
    classes = [{"class_id": c, "class_name": f"c{c}", "pixels": int((cmap == c).sum())} for c in (2, 7)]
    body = {"size": [120, 160], "ignore": 255, "classes": classes}
    if encoding == "rle":
        for c in classes:
            c["mask"] = encode_rle((cmap == c["class_id"]).astype(np.uint8))
    else:
        body.update(bits=8, png=base64.b64encode(encode_class_map_png(cmap)).decode())
    return cmap, {"semantic": body}


def test_semantic_map_decodes_from_both_encodings_and_is_drawn_in_class_colours():
    image = np.zeros((120, 160, 3), np.uint8)
    for enc in ("rle", "png"):
        cmap, result = _semantic(enc)
        assert np.array_equal(semantic_class_map(result["semantic"]), cmap)
        out = draw_semantic(image, result)
        # right of the legend, each region is half its class colour over the black image
        assert np.allclose(out[100, 60], np.array(class_color(2)) * 0.5, atol=1)
        assert np.allclose(out[100, 140], np.array(class_color(7)) * 0.5, atol=1)
        assert (out[:40, :40] != out[100, 60]).any(), "a legend is drawn in the top-left corner"


def test_depth_is_drawn_beside_the_photo_near_brighter_than_far():
    h, w = 100, 80
    d = np.tile(np.linspace(1.0, 20.0, h, dtype=np.float32)[:, None], (1, w))  # far at the bottom
    png, lo, hi = encode_depth_png16(d)
    image = np.full((h, w, 3), 30, np.uint8)
    out = draw_depth(image, {"depth": {"size": [h, w], "unit": "m", "min": lo, "max": hi, "png16": base64.b64encode(png).decode()}})
    assert out.shape[0] == h and out.shape[1] > 2 * w  # photo, depth, scale bar
    assert np.array_equal(out[:, :w], image)
    near, far = out[5, w + w // 2].astype(int).sum(), out[h - 5, w + w // 2].astype(int).sum()
    assert near > far, (near, far)
    bar = out[:, 2 * w:]
    assert (bar == 0).any(), "the scale bar has labels"
