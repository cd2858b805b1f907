"""export/matching.py, the one detection matcher of the export checks, the INT8 drift and the GPU check, against a
plain loop; and export.verify.compare_detections, which reports what the matcher leaves over."""

from __future__ import annotations

import numpy as np
import pytest

from export.matching import box_iou, greedy_match
from export.verify import Tolerance, compare_detections


def _slow_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union


def _slow_match(ref, other, min_iou):
    order = sorted(range(len(ref)), key=lambda i: -ref[i][4])  # sorted() is stable: ties in row order
    taken, pairs = set(), []
    for i in order:
        best, best_iou = -1, 0.0
        for j in range(len(other)):
            iou = _slow_iou(ref[i], other[j])
            if j not in taken and other[j][5] == ref[i][5] and iou > best_iou:
                best, best_iou = j, iou
        if best >= 0 and best_iou >= min_iou:
            taken.add(best)
            pairs.append((i, best))
    return pairs


def _rows(rng, n, nc=3):
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(5, 80, (n, 2))
    score = rng.choice([0.3, 0.5, 0.9], n)  # ties on purpose
    return np.column_stack([xy, xy + wh, score, rng.integers(0, nc, n)])


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("min_iou", [0.0, 0.3, 0.5])
def test_greedy_match_equals_a_plain_loop(seed, min_iou):
    rng = np.random.default_rng(seed)
    ref = _rows(rng, int(rng.integers(0, 25)))
    other = ref.copy()
    other[:, :4] += rng.normal(0, 6, (len(ref), 4))  # moved boxes: some pairs overlap less, some not at all
    other = np.concatenate([other, _rows(rng, int(rng.integers(0, 8)))])
    other = other[rng.permutation(len(other))]
    got = greedy_match(ref, other, min_iou)
    assert [(r, o) for r, o, _ in got] == _slow_match(ref.tolist(), other.tolist(), min_iou)
    for r, o, iou in got:
        assert iou == pytest.approx(_slow_iou(ref[r], other[o]), abs=1e-12)


def test_box_iou_edges():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [5, 0, 15, 10]], np.float32)
    assert box_iou(a, b)[0].tolist() == pytest.approx([1.0, 0.0, 50 / 150])
    assert box_iou(a[:0], b).shape == (0, 3)


def test_compare_detections_names_what_differs():
    ref = np.array([[0, 0, 100, 100, 0.9, 0], [200, 200, 300, 300, 0.8, 1]], np.float64)
    assert compare_detections(ref.copy(), ref, 0.25) == []
    moved = ref.copy()
    moved[0, :4] += 2  # IoU 0.92
    assert any("box IoU" in p for p in compare_detections(moved, ref, 0.25))
    assert any("has no match" in p for p in compare_detections(ref[:1], ref, 0.25))
    assert any("is not in Ultralytics' output" in p for p in compare_detections(ref, ref[:1], 0.25))
    near_conf = ref[:1].copy()
    near_conf[0, 4] = 0.252  # within Tolerance().edge of conf: may be missing on one side
    assert compare_detections(np.zeros((0, 6)), near_conf, 0.25, Tolerance()) == []
