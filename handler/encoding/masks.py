"""Binary instance masks -> what a response carries: COCO RLE, and on request a polygon.

COCO run-length encoding (what ``pycocotools.mask.decode`` reads): the mask is read in column-major
(Fortran) order; ``counts`` alternates runs of 0s and 1s, starting with 0s (possibly an empty run);
``size`` is ``[height, width]``. The compressed string form is pycocotools' ``rleToString``: each
count (from the fourth on, minus the count two places before) as a little-endian sequence of 5-bit
groups, 0x20 marking "more follows", each group offset by 48 into printable ASCII.

Both steps are vectorised numpy: the runs come from the changes along each column of the mask's
bounding region, the string from all counts' 5-bit groups at once.
"""

from __future__ import annotations

import cv2
import numpy as np

_GROUPS = 8  # 5-bit groups per count: enough for any |count| < 2**39 (masks up to 500 gigapixels)


def rle_counts(mask: np.ndarray) -> np.ndarray:
    """``mask: [H, W]`` (bool or 0/1) -> ``int64[k]`` COCO run lengths, column-major, starting with 0s.

    Only the rows and columns the mask touches are scanned; outside them everything is 0."""
    h, w = mask.shape
    cols = np.flatnonzero(mask.any(0))
    if len(cols) == 0:
        return np.array([h * w], dtype=np.int64)
    rows = np.flatnonzero(mask.any(1))
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
    hs = y1 - y0
    padded = np.zeros((x1 - x0, hs + 2), dtype=np.int8)  # one column of the mask per row, a 0 above and below
    padded[:, 1:-1] = mask[y0:y1, x0:x1].T
    k = np.flatnonzero(padded[:, 1:] != padded[:, :-1])  # [2 * runs]: where a run of 1s starts, then where it ends
    col, row = np.divmod(k, hs + 1)
    edges = (x0 + col) * h + y0 + row  # pixel index (column-major) of the first 1, then of the first 0 after it
    if hs == h:  # a run that ends at the bottom of a column and goes on at the top of the next is one run
        joined = edges[1:] == edges[:-1]
        edges = edges[~(np.append(joined, False) | np.insert(joined, 0, False))]
    counts = np.diff(np.concatenate(([0], edges, [h * w])))
    return counts[:-1] if counts[-1] == 0 else counts  # a mask ending in 1s has no final run of 0s


def rle_string(counts: np.ndarray) -> str:
    """COCO run lengths -> pycocotools' compressed ``counts`` string (its ``rleToString``)."""
    x = counts.astype(np.int64).copy()
    x[3:] -= counts[1:-2].astype(np.int64)  # from the fourth count on, the difference to the one two back
    shifts = 5 * np.arange(_GROUPS, dtype=np.int64)
    groups = (x[:, None] >> shifts) & 0x1F  # [k, G] 5-bit groups, least significant first
    rest = x[:, None] >> (shifts + 5)  # what is left after each group (arithmetic shift keeps the sign)
    more = np.where(groups & 0x10, rest != -1, rest != 0)  # [k, G]: another group follows this one
    length = np.argmin(more, axis=1) + 1  # groups used: up to the first one with nothing more
    chars = (groups | np.where(more, 0x20, 0)) + 48
    used = np.arange(_GROUPS)[None, :] < length[:, None]
    return chars[used].astype(np.uint8).tobytes().decode("ascii")


def encode_rle(mask: np.ndarray) -> dict:
    """``mask: [H, W]`` binary -> ``{"size": [H, W], "counts": "<compressed string>"}``."""
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle_string(rle_counts(mask))}


def mask_polygon(mask: np.ndarray) -> list[list[float]]:
    """The outline of the mask's largest region, ``[[x, y], ...]`` pixel coordinates (OpenCV's external
    contour, simple chain approximation; Ultralytics' ``masks2segments(strategy="largest")``), ``[]`` when empty."""
    contours = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
    if not contours:
        return []
    largest = max(contours, key=len).reshape(-1, 2)
    return largest.astype(float).tolist()
