"""Pictures of dense answers for ``yolo-ts-client --save``: a semantic class map as a colour overlay with a
legend of the classes present, and a depth map colour-mapped beside the photo with a scale bar in metres.

Both take the image the client sent (``uint8[H, W, 3]`` BGR) and the response body, and decode the body
the way any client would (RLE or PNG for classes, PNG16 or float32 for depth), with OpenCV and numpy only.
"""

from __future__ import annotations

import base64

import cv2
import numpy as np

OVERLAY_ALPHA = 0.5


def class_color(class_id: int) -> tuple[int, int, int]:
    """A stable colour per class id (the client's detection colours)."""
    rng = np.random.default_rng(class_id)
    return tuple(int(c) for c in rng.integers(64, 256, 3))


def semantic_class_map(semantic: dict) -> np.ndarray:
    """``"semantic"`` of a response -> ``int64[H, W]`` class ids, ``ignore`` (255) where no class is kept."""
    if "png" in semantic:
        return cv2.imdecode(np.frombuffer(base64.b64decode(semantic["png"]), np.uint8), cv2.IMREAD_UNCHANGED).astype(np.int64)
    from tools.client import decode_rle  # the client's own decoder (it imports this module)

    out = np.full(semantic["size"], semantic["ignore"], np.int64)
    for c in semantic["classes"]:
        out[decode_rle(c["mask"]).astype(bool)] = c["class_id"]
    return out


def draw_semantic(image: np.ndarray, result: dict) -> np.ndarray:
    """Each class present blended over the photo in its colour, and a legend (colour, name, share of pixels)."""
    sem = result["semantic"]
    class_map = semantic_class_map(sem)
    out = image.copy()
    total = max(1, class_map.size)
    for c in sem["classes"]:
        where = class_map == c["class_id"]
        out[where] = (out[where] * (1 - OVERLAY_ALPHA) + np.array(class_color(c["class_id"])) * OVERLAY_ALPHA).astype(np.uint8)
    thick = max(1, round(sum(out.shape[:2]) / 900))
    scale = thick / 2.5
    y = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][1] + thick * 4
    for c in sorted(sem["classes"], key=lambda c: -c["pixels"]):
        label = f"{c['class_name']} {100 * c['pixels'] / total:.1f}%"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        box = th + base
        cv2.rectangle(out, (thick * 2, y - th), (thick * 2 + box, y + base), class_color(c["class_id"]), -1)
        cv2.rectangle(out, (thick * 3 + box, y - th - thick), (thick * 4 + box + tw, y + base), (0, 0, 0), -1)
        cv2.putText(out, label, (thick * 3 + box, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
        y += box + thick * 2
        if y > out.shape[0] - box:
            break
    return out


def depth_map(depth: dict) -> np.ndarray:
    """``"depth"`` of a response -> ``float32[H, W]`` metres."""
    h, w = depth["size"]
    if "float32" in depth:
        return np.frombuffer(base64.b64decode(depth["float32"]), dtype="<f4").reshape(h, w).astype(np.float32)
    v = cv2.imdecode(np.frombuffer(base64.b64decode(depth["png16"]), np.uint8), cv2.IMREAD_UNCHANGED)
    return (depth["min"] + (depth["max"] - depth["min"]) * v.astype(np.float64) / 65535).astype(np.float32)


def draw_depth(image: np.ndarray, result: dict) -> np.ndarray:
    """The photo, then the depth colour-mapped (near bright, far dark: inferno), then a scale bar labelled in
    metres, side by side. The colours span the 1st to 99th percentile on a log scale, so that a few far
    pixels (the sky) do not wash out the rest; the bar says where."""
    d = np.maximum(depth_map(result["depth"]), 1e-6)
    lo, hi = (float(v) for v in np.percentile(d, [1, 99]))
    hi = max(hi, lo * 1.0001)
    norm = np.clip((np.log(d) - np.log(lo)) / (np.log(hi) - np.log(lo)), 0, 1)
    colored = cv2.applyColorMap(((1 - norm) * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    h = image.shape[0]
    if colored.shape[:2] != image.shape[:2]:
        colored = cv2.resize(colored, (image.shape[1], h), interpolation=cv2.INTER_NEAREST)
    thick = max(1, round(h / 600))
    bar_w = max(90, h // 6)
    bar = np.full((h, bar_w, 3), 255, np.uint8)
    ramp = cv2.applyColorMap(np.linspace(255, 0, h).astype(np.uint8)[:, None].repeat(bar_w // 3, 1), cv2.COLORMAP_INFERNO)
    bar[:, : bar_w // 3] = ramp  # top: near (1st percentile), bottom: far (99th), log scale
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = int(frac * (h - 1))
        metres = float(np.exp(np.log(lo) + frac * (np.log(hi) - np.log(lo))))
        ty = min(max(y + 5 * thick, 12 * thick), h - 3 * thick)
        cv2.line(bar, (bar_w // 3, y), (bar_w // 3 + 4 * thick, y), (0, 0, 0), thick)
        cv2.putText(bar, f"{metres:.1f} m", (bar_w // 3 + 5 * thick, ty), cv2.FONT_HERSHEY_SIMPLEX, thick / 2.5, (0, 0, 0), thick, cv2.LINE_AA)
    return np.hstack([image, colored, bar])
