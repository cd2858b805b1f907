"""A deterministic test video for tracking, made from Ultralytics' two sample images (no download).

Four people cut from ``bus.jpg`` and ``zidane.jpg`` walk over a background made from the top of
``bus.jpg`` (the bus and the street, nobody on it) while the camera pans slowly (so BoT-SORT's motion
compensation has work to do):
- A walks left -> right and B right -> left on the same line, so they cross and A (in front)
  hides B for a few frames;
- C walks diagonally through the crossing, behind both;
- D enters from the right late in the clip (a birth) and E leaves the frame early (a death).

Every frame is a pure function of its index (integer positions, ``cv2.INTER_AREA`` resizes), so
the clip is the same on every machine with the same OpenCV.

CLI: ``python -m tools.make_clip OUT.mp4 [--frames N]`` writes it as an MP4 (``mp4v``, 10 fps).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 960, 540
DEFAULT_FRAMES = 48
PAN_PX_PER_FRAME = 3  # the camera pans right: the background moves left
FPS = 10


def asset_dir() -> Path:
    """``ultralytics/assets`` (bus.jpg, zidane.jpg); only the image files are read."""
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ultralytics package (for its sample images bus.jpg and zidane.jpg) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "assets"


@dataclass(frozen=True)
class Walker:
    """One pasted person: ``crop`` (x1, y1, x2, y2) of ``image``, scaled to ``height`` px, whose
    top-left corner is at ``start + frame * velocity`` during frames ``first..last``; larger ``z`` in front."""

    image: str
    crop: tuple[int, int, int, int]
    height: int
    start: tuple[float, float]
    velocity: tuple[float, float]
    z: int
    first: int = 0
    last: int = 10**9


# Person boxes of the sample images (yolo11n-pose finds them there with scores 0.84-0.89).
WALKERS = (
    Walker("bus.jpg", (48, 400, 244, 906), 300, (40, 200), (17.0, 0.0), z=3),  # A: left -> right, in front
    Walker("bus.jpg", (669, 388, 810, 878), 290, (800, 215), (-15.0, 0.0), z=2),  # B: right -> left
    Walker("bus.jpg", (223, 405, 344, 859), 250, (300, 20), (6.0, 5.5), z=1),  # C: diagonal, behind
    Walker("zidane.jpg", (744, 37, 1142, 710), 260, (960, 10), (-14.0, 0.0), z=0, first=24),  # D: enters late
    Walker("bus.jpg", (48, 400, 244, 906), 200, (160, 320), (-9.0, 0.0), z=4, last=30),  # E: walks out left
)


def _load(name: str) -> np.ndarray:
    path = asset_dir() / name
    img = cv2.imread(str(path))
    if img is None:
        raise FileNotFoundError(path)
    return img


def _background(bus: np.ndarray, frames: int) -> np.ndarray:
    """The top of bus.jpg (rows 0..380, no person) stretched to cover the whole pan."""
    top = bus[:380]
    width = WIDTH + PAN_PX_PER_FRAME * frames
    return cv2.resize(top, (width, HEIGHT), interpolation=cv2.INTER_AREA)


def _paste(canvas: np.ndarray, patch: np.ndarray, x: int, y: int) -> None:
    h, w = patch.shape[:2]
    x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, WIDTH), min(y + h, HEIGHT)
    if x1 < x2 and y1 < y2:
        canvas[y1:y2, x1:x2] = patch[y1 - y: y2 - y, x1 - x: x2 - x]


def make_clip(frames: int = DEFAULT_FRAMES) -> list[np.ndarray]:
    """``frames`` BGR frames ``uint8[540, 960, 3]``."""
    images = {name: _load(name) for name in {w.image for w in WALKERS}}
    background = _background(images["bus.jpg"], frames)
    patches = []
    for w in WALKERS:
        x1, y1, x2, y2 = w.crop
        crop = images[w.image][y1:y2, x1:x2]
        width = max(1, round(crop.shape[1] * w.height / crop.shape[0]))
        patches.append(cv2.resize(crop, (width, w.height), interpolation=cv2.INTER_AREA))
    order = sorted(range(len(WALKERS)), key=lambda i: WALKERS[i].z)
    clip = []
    for f in range(frames):
        pan = PAN_PX_PER_FRAME * f
        canvas = np.ascontiguousarray(background[:, pan: pan + WIDTH])
        for i in order:
            w = WALKERS[i]
            if w.first <= f <= w.last:
                x = round(w.start[0] + w.velocity[0] * (f - w.first))
                y = round(w.start[1] + w.velocity[1] * (f - w.first))
                _paste(canvas, patches[i], x, y)
        clip.append(canvas)
    return clip


def write_mp4(frames: list[np.ndarray], path: str | Path, fps: int = FPS) -> Path:
    path = Path(path)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output .mp4")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    args = parser.parse_args(argv)
    print(write_mp4(make_clip(args.frames), args.out))


if __name__ == "__main__":
    main()
