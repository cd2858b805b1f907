"""handler/tracking against Ultralytics 8.4.190's own trackers.

Fast: parameters vs the YAML files, the Kalman filters, costs, assignment and GMC on random inputs,
and whole trackers fed the same synthetic detections (crossings, births, deaths, misses, low-score
second-stage matches, OBB), compared row for row with ``BYTETracker`` / ``BOTSORT``.
Slow: the test clip through the exported yolo11n-pose pipeline and our tracker vs
``YOLO(weights).track(frame, persist=True, tracker=...)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lap")
ultralytics = pytest.importorskip("ultralytics")

from ultralytics.engine.results import OBB, Boxes  # noqa: E402
from ultralytics.trackers import BOTSORT, BYTETracker  # noqa: E402
from ultralytics.trackers.utils import gmc as u_gmc  # noqa: E402
from ultralytics.trackers.utils import kalman_filter as u_kf  # noqa: E402
from ultralytics.trackers.utils import matching as u_matching  # noqa: E402
from ultralytics.utils import YAML, IterableSimpleNamespace  # noqa: E402

from handler.tracking import BotSortParams, ByteTrackParams, FrameDetections, create_tracker, kalman, matching, tracker_params  # noqa: E402  # noqa: E402
from handler.tracking.gmc import GlobalMotion  # noqa: E402
from serving_support import check_tracked_frame  # noqa: E402

from tools.server import REPO_ROOT  # noqa: E402

TRACKER_YAML = Path(ultralytics.__file__).parent / "cfg" / "trackers"


def ultralytics_args(name: str, overrides: dict | None = None) -> IterableSimpleNamespace:
    cfg = YAML.load(TRACKER_YAML / f"{name}.yaml")
    cfg.update(overrides or {})
    return IterableSimpleNamespace(**cfg)


def ultralytics_tracker(name: str, overrides: dict | None = None):
    args = ultralytics_args(name, overrides)
    return (BOTSORT if name == "botsort" else BYTETracker)(args)


# ---------------------------------------------------------------------------------------------------
# parameters


@pytest.mark.parametrize("name", ["bytetrack", "botsort"])
def test_defaults_are_the_yaml_files(name):
    yaml = YAML.load(TRACKER_YAML / f"{name}.yaml")
    params = tracker_params(name)
    ours = {k: getattr(params, k) for k in params.__dataclass_fields__}
    theirs = {k: v for k, v in yaml.items() if k not in ("tracker_type", "model")}
    assert ours == theirs
    assert params.tracker_type == yaml["tracker_type"]
    assert tracker_params(f"{name}.yaml", yaml) == params  # a copy of the file is accepted as overrides


@pytest.mark.parametrize(
    "name, overrides, words",
    [
        ("bytetrack", {"track_high_thresh": 1.5}, ["track_high_thresh", "0 to 1"]),
        ("bytetrack", {"match_thresh": -0.1}, ["match_thresh", "0 to 1"]),
        ("bytetrack", {"track_buffer": -1}, ["track_buffer", "0 to 100000"]),
        ("bytetrack", {"track_buffer": 2.5}, ["track_buffer", "integer"]),
        ("bytetrack", {"fuse_score": "maybe"}, ["fuse_score", "true or false"]),
        ("bytetrack", {"gmc_method": "orb"}, ["unknown bytetrack parameter", "gmc_method", "valid keys"]),
        ("botsort", {"gmc_method": "optical"}, ["gmc_method", "sparseOptFlow"]),
        ("botsort", {"with_reid": True}, ["with_reid", "false"]),
        ("botsort", {"appearance_thresh": "high"}, ["appearance_thresh", "0 to 1"]),
        ("botsort", {"tracker_type": "bytetrack"}, ["tracker_type", "contradicts"]),
        ("deepsort", {}, ["tracker must be one of", "bytetrack", "botsort"]),
    ],
)
def test_bad_parameters_name_the_key_and_range(name, overrides, words):
    with pytest.raises(ValueError) as err:
        tracker_params(name, overrides)
    for word in words:
        assert word in str(err.value)


def test_parameters_from_text_values():
    """Request options may arrive as text (query or form fields)."""
    p = tracker_params("botsort", {"track_buffer": "60", "match_thresh": "0.7", "fuse_score": "false",
                                   "gmc_method": "none"})
    assert p == BotSortParams(track_buffer=60, match_thresh=0.7, fuse_score=False, gmc_method="none")
    assert isinstance(tracker_params("ByteTrack"), ByteTrackParams)


# ---------------------------------------------------------------------------------------------------
# Kalman filters, costs, assignment


@pytest.mark.parametrize("ours_cls, theirs_cls", [(kalman.KalmanFilterXYAH, u_kf.KalmanFilterXYAH),
                                                  (kalman.KalmanFilterXYWH, u_kf.KalmanFilterXYWH)])
@pytest.mark.parametrize("seed", range(5))
def test_kalman_filter_equals_ultralytics(ours_cls, theirs_cls, seed):
    rng = np.random.default_rng(seed)
    ours, theirs = ours_cls(), theirs_cls()
    for _ in range(3):
        z = np.r_[rng.uniform(0, 1000, 2), rng.uniform(0.2, 3, 1), rng.uniform(5, 400, 1)]
        m1, c1 = ours.initiate(z)
        m2, c2 = theirs.initiate(z)
        assert np.array_equal(m1, m2) and np.array_equal(c1, c2)
        for _ in range(4):
            m1, c1 = ours.predict(m1, c1)
            m2, c2 = theirs.predict(m2, c2)
            assert np.array_equal(m1, m2) and np.array_equal(c1, c2)
            meas = z + rng.normal(0, 2, 4) * [1, 1, 0.01, 1]
            m1, c1 = ours.update(m1, c1, meas)
            m2, c2 = theirs.update(m2, c2, meas)
            assert np.array_equal(m1, m2) and np.array_equal(c1, c2)
        p1, p2 = ours.project(m1, c1), theirs.project(m2, c2)
        assert all(np.array_equal(a, b) for a, b in zip(p1, p2))
    means = rng.uniform(1, 300, (7, 8))
    covs = np.stack([np.diag(rng.uniform(0.1, 5, 8)) for _ in range(7)])
    for a, b in zip(ours.multi_predict(means, covs), theirs.multi_predict(means, covs)):
        assert np.array_equal(a, b)


def random_xyxy(rng, n):
    xy = rng.uniform(0, 500, (n, 2))
    wh = rng.uniform(5, 150, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.mark.parametrize("seed", range(10))
def test_costs_and_assignment_equal_ultralytics(seed):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(0, 12, 2)
    a, b = random_xyxy(rng, n), random_xyxy(rng, m)
    cost = matching.iou_distance(list(a), list(b))
    assert np.array_equal(cost, u_matching.iou_distance(list(a), list(b)))
    scores = rng.uniform(0.1, 1, m).astype(np.float32)
    fused = matching.fuse_score(cost, scores)
    dets = [type("D", (), {"score": s})() for s in scores]
    assert np.array_equal(fused, u_matching.fuse_score(cost, dets))
    for thresh in (0.3, 0.5, 0.8, 0.95):
        ours = matching.linear_assignment(fused, thresh)
        theirs = u_matching.linear_assignment(fused, thresh)
        assert [list(map(int, p)) for p in ours[0]] == [list(map(int, p)) for p in theirs[0]]
        assert list(ours[1]) == list(theirs[1]) and list(ours[2]) == list(theirs[2])
    obb1 = np.c_[rng.uniform(0, 500, (n, 2)), rng.uniform(5, 150, (n, 2)), rng.uniform(-1.6, 1.6, n)]
    obb2 = np.c_[rng.uniform(0, 500, (m, 2)), rng.uniform(5, 150, (m, 2)), rng.uniform(-1.6, 1.6, m)]
    assert np.array_equal(matching.iou_distance(list(obb1), list(obb2)),
                          u_matching.iou_distance(list(obb1), list(obb2)))


def test_assignment_respects_the_cost_limit():
    cost = np.array([[0.1, 0.9], [0.85, 0.2], [0.5, 0.95]], dtype=np.float32)
    matches, u_a, u_b = matching.linear_assignment(cost, 0.4)
    assert [list(p) for p in matches] == [[0, 0], [1, 1]] and list(u_a) == [2] and list(u_b) == []
    matches, u_a, u_b = matching.linear_assignment(np.zeros((0, 3), np.float32), 0.5)
    assert len(matches) == 0 and list(u_b) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------
# synthetic detections


def textured_frames(rng, n_frames, pan, size=(240, 320)):
    """Frames of one random texture panned by ``pan[f]`` pixels (so GMC sees camera motion)."""
    import cv2

    h, w = size
    extra = int(np.abs(pan).max()) + 2
    base = rng.integers(0, 256, (h + 2 * extra, w + 2 * extra, 3), dtype=np.uint8)
    base = cv2.GaussianBlur(base, (0, 0), 2.0)
    out = []
    for f in range(n_frames):
        x = extra + int(pan[f][0])
        y = extra + int(pan[f][1])
        out.append(np.ascontiguousarray(base[y: y + h, x: x + w]))
    return out


def synthetic_sequence(seed: int, obb: bool, n_frames: int = 40):
    """Per frame: ``(boxes, scores, classes)`` and a frame. Objects on crossing straight paths, each
    with its life span; per frame some are missed (occlusion), some get low scores (second stage),
    plus a few false positives; the whole scene drifts with the camera pan."""
    rng = np.random.default_rng(seed)
    n_obj = 7
    start = rng.uniform([20, 20], [300, 220], (n_obj, 2))
    end = rng.uniform([20, 20], [300, 220], (n_obj, 2))
    size = rng.uniform([15, 25], [60, 90], (n_obj, 2))
    birth = rng.integers(0, n_frames // 2, n_obj)
    birth[:3] = 0
    death = np.minimum(n_frames, birth + rng.integers(n_frames // 3, n_frames, n_obj))
    angle0 = rng.uniform(-1.5, 1.5, n_obj)
    pan = np.cumsum(rng.integers(-2, 3, (n_frames, 2)), axis=0)
    frames = textured_frames(rng, n_frames, pan)
    seq = []
    for f in range(n_frames):
        rows = []
        for k in range(n_obj):
            if not birth[k] <= f < death[k] or rng.random() < 0.08:  # not there, or missed
                continue
            t = (f - birth[k]) / max(1, death[k] - birth[k])
            c = start[k] + (end[k] - start[k]) * t - pan[f] + rng.normal(0, 1.0, 2)
            wh = size[k] * (1 + rng.normal(0, 0.03, 2))
            r = rng.random()
            score = rng.uniform(0.11, 0.25) if r < 0.15 else rng.uniform(0.3, 0.95)
            rows.append((c, wh, angle0[k] + 0.02 * f, score, k % 3))
        for _ in range(rng.poisson(0.5)):  # false positives
            rows.append((rng.uniform(0, 320, 2), rng.uniform(10, 50, 2), rng.uniform(-1.5, 1.5),
                         rng.uniform(0.1, 0.5), 0))
        order = rng.permutation(len(rows))
        rows = [rows[i] for i in order]
        if obb:
            boxes = np.array([[*c, *wh, a] for c, wh, a, _, _ in rows], dtype=np.float32).reshape(-1, 5)
        else:
            boxes = np.array([[*(c - wh / 2), *(c + wh / 2)] for c, wh, _, _, _ in rows], dtype=np.float32).reshape(-1, 4)
        scores = np.array([s for *_, s, _ in rows], dtype=np.float32)
        classes = np.array([k for *_, k in rows], dtype=np.float32)
        seq.append((boxes, scores, classes))
    return seq, frames


def ultralytics_results(boxes, scores, classes, obb):
    data = np.concatenate([boxes, scores[:, None], classes[:, None]], 1)
    return OBB(data, (240, 320)) if obb else Boxes(data, (240, 320))


def assert_same_tracks(ours, theirs, frame):
    theirs = np.asarray(theirs, dtype=np.float32)
    width = ours.shape[1]
    theirs = theirs.reshape(-1, width)
    assert ours.shape == theirs.shape, f"frame {frame}: {ours.shape} rows vs Ultralytics' {theirs.shape}"
    assert np.array_equal(ours, theirs), f"frame {frame}:\n{ours}\nUltralytics:\n{theirs}"


CONFIGS = [
    ("bytetrack", {}),
    ("botsort", {}),
    ("bytetrack", {"fuse_score": False, "match_thresh": 0.7, "track_buffer": 4, "new_track_thresh": 0.4}),
    ("botsort", {"gmc_method": "none", "track_high_thresh": 0.5, "track_low_thresh": 0.2, "track_buffer": 2}),
    ("botsort", {"gmc_method": "orb"}),
]


@pytest.mark.parametrize("name, overrides", CONFIGS)
@pytest.mark.parametrize("obb", [False, True], ids=["boxes", "obb"])
@pytest.mark.parametrize("seed", range(4))
def test_tracker_equals_ultralytics_on_synthetic_detections(name, overrides, obb, seed):
    seq, frames = synthetic_sequence(seed, obb)
    ours = create_tracker(tracker_params(name, overrides))
    theirs = ultralytics_tracker(name, overrides)
    stats = {"ids": set(), "low_matches": 0, "lost_then_found": 0}
    for f, ((boxes, scores, classes), frame) in enumerate(zip(seq, frames)):
        got = ours.update(FrameDetections(boxes, scores, classes), frame)
        want = theirs.update(ultralytics_results(boxes, scores, classes, obb), frame)
        assert_same_tracks(got.rows, want, f)
        assert got.pending == any(not t.is_activated for t in theirs.tracked_stracks)
        if len(got.rows):
            stats["ids"].update(got.rows[:, -4].astype(int).tolist())
            idx = got.rows[:, -1].astype(int)
            stats["low_matches"] += int((scores[idx] < 0.25).sum())
    # the sequence exercised what it is meant to
    assert len(stats["ids"]) >= 5
    if name == "bytetrack" and not overrides:
        assert stats["low_matches"] > 0


def test_rows_map_back_to_the_callers_index():
    rng = np.random.default_rng(0)
    boxes = random_xyxy(rng, 5)
    scores = np.array([0.9, 0.05, 0.8, 0.7, 0.6], np.float32)
    rows = np.array([10, 11, 12, 13, 14])
    tracker = create_tracker(tracker_params("bytetrack"))
    out = tracker.update(FrameDetections(boxes, scores, np.zeros(5, np.float32), rows)).rows
    assert sorted(out[:, -1].astype(int).tolist()) == [10, 12, 13, 14]
    for r in out:
        assert np.allclose(r[:4], boxes[int(r[-1]) - 10], atol=1e-3)


def test_each_tracker_counts_its_own_ids():
    """Two streams interleaved give each stream's IDs alone (Ultralytics 8.4.190: per-tracker counters)."""
    seq_a, frames_a = synthetic_sequence(1, False)
    seq_b, frames_b = synthetic_sequence(2, False)
    alone = []
    for seq, frames in ((seq_a, frames_a), (seq_b, frames_b)):
        t = create_tracker(tracker_params("botsort"))
        alone.append([t.update(FrameDetections(*d), fr).rows for d, fr in zip(seq, frames)])
    ta, tb = create_tracker(tracker_params("botsort")), create_tracker(tracker_params("botsort"))
    for f in range(len(seq_a)):
        assert np.array_equal(ta.update(FrameDetections(*seq_a[f]), frames_a[f]).rows, alone[0][f])
        assert np.array_equal(tb.update(FrameDetections(*seq_b[f]), frames_b[f]).rows, alone[1][f])
    assert alone[0][0][:, 4].min() == 1 and alone[1][0][:, 4].min() == 1


def test_reset_restarts_ids_and_state():
    seq, frames = synthetic_sequence(3, False)
    t = create_tracker(tracker_params("bytetrack"))
    first = [t.update(FrameDetections(*d), fr).rows for d, fr in zip(seq[:10], frames[:10])]
    t.reset()
    again = [t.update(FrameDetections(*d), fr).rows for d, fr in zip(seq[:10], frames[:10])]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_empty_and_degenerate_detections():
    t = create_tracker(tracker_params("botsort"))
    frame = np.zeros((60, 80, 3), np.uint8)
    empty = FrameDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32))
    out = t.update(empty, frame)
    assert out.rows.shape == (0, 8) and not out.pending and out.shows_untracked_detections
    flat = FrameDetections(np.array([[10, 10, 10, 30]], np.float32), np.array([0.9], np.float32), np.zeros(1, np.float32))
    assert t.update(flat, frame).rows.shape == (0, 8)  # zero width: dropped, as Ultralytics does
    with pytest.raises(ValueError):
        FrameDetections(np.zeros((2, 3), np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32))


# ---------------------------------------------------------------------------------------------------
# GMC on the test clip


@pytest.mark.parametrize("method", ["sparseOptFlow", "orb", "sift", "ecc", "none"])
def test_gmc_equals_ultralytics_on_the_clip(method):
    from tools.make_clip import make_clip

    clip = make_clip(6 if method != "ecc" else 3)
    ours, theirs = GlobalMotion(method), u_gmc.GMC(method=method)
    dets = np.array([[100, 100, 300, 400], [500, 50, 700, 500]], np.float32)
    moved = 0
    for frame in clip:
        a, b = ours.apply(frame, dets), theirs.apply(frame, dets)
        assert np.array_equal(a, b), (method, a, b)
        moved += int(not np.allclose(a, np.eye(2, 3)))
    if method != "none":
        assert moved >= len(clip) - 2  # the camera pans: the warps are not identity


def test_test_clip_is_deterministic():
    from tools.make_clip import DEFAULT_FRAMES, make_clip

    a, b = make_clip(), make_clip()
    assert len(a) == DEFAULT_FRAMES >= 40
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (540, 960, 3) and a[0].dtype == np.uint8


# ---------------------------------------------------------------------------------------------------
# slow: real model, exported pipeline


def exported_detections(pipeline, frame: np.ndarray, conf: float) -> np.ndarray:
    """The exported pipeline's rows ``float32[n, ncols]`` (x1, y1, x2, y2, score, class, ...) for one frame."""
    import torch

    from handler.tasks.detect import Thresholds

    with torch.inference_mode():
        outputs, _ = pipeline.infer([pipeline.prepare(frame, Thresholds(conf=conf))])
    return outputs[0].rows.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bytetrack", "botsort"])
def test_clip_tracks_equal_yolo_track(name, pose_weights, pose_export):
    """Our tracker fed the exported pipeline's detections (conf 0.1, what ``track`` uses) gives, frame by
    frame, the rows of ``YOLO.track(frame, persist=True)``: same IDs in the same order on the same
    objects (box IoU >= 0.99), the same frames without IDs."""
    from ultralytics import YOLO

    from handler.pipeline import YoloPipeline
    from tools.make_clip import make_clip

    clip = make_clip()
    pipeline = YoloPipeline.from_dir(pose_export.out_dir)
    model = YOLO(str(pose_weights))
    tracker = create_tracker(tracker_params(name))
    ids_seen, tracked_frames, worst = set(), 0, 1.0
    for f, frame in enumerate(clip):
        dets = exported_detections(pipeline, frame, conf=0.1)
        out = tracker.update(FrameDetections(dets[:, :4].copy(), dets[:, 4].copy(), dets[:, 5].copy()), frame)
        want = model.track(frame, persist=True, tracker=f"{name}.yaml", verbose=False)[0]
        if not want.boxes.is_track:  # Ultralytics shows the raw detections (or none) on such frames
            assert len(out.rows) == 0, f"frame {f}: we track {len(out.rows)} objects, YOLO.track none"
            assert out.shows_untracked_detections == (len(want.boxes) > 0), f"frame {f}"
            continue
        g_ids = out.rows[:, 4].astype(int).tolist()
        shown = out.clipped(*frame.shape[:2])
        # the detection each track took is the one YOLO.track attached (its keypoints follow it)
        kpt_ours = dets[out.rows[:, -1].astype(int), 6:].reshape(len(g_ids), -1, 3)[..., :2]
        worst = min(worst, check_tracked_frame(f, g_ids, shown[:, :4], kpt_ours, want.boxes.id.numpy().astype(int).tolist(),
                                               want.boxes.xyxy.numpy(), want.keypoints.data.numpy()[..., :2]))
        ids_seen.update(g_ids)
        tracked_frames += 1
    print(f"{name}: {tracked_frames}/{len(clip)} frames with IDs equal, {len(ids_seen)} IDs, worst IoU {worst:.6f}")
    assert tracked_frames >= 40 and len(ids_seen) >= 4


# ---------------------------------------------------------------------------------------------------
# the stream registry


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_stream_registry_life_cycle():
    from handler.tracking.registry import StreamError, StreamRegistry

    clock = FakeClock()
    reg = StreamRegistry(max_streams=2, idle_s=5.0, clock=clock)
    a = reg.start(tracker_params("bytetrack"))
    b = reg.start(tracker_params("botsort"), stream_id="ts-seq-given")
    assert a.id.startswith(f"trk-{reg.epoch}-") and b.id == "ts-seq-given" and len(reg) == 2
    assert reg.get(a.id) is a and isinstance(b.tracker, type(create_tracker(tracker_params("botsort"))))
    with pytest.raises(StreamError) as err:
        reg.start(tracker_params("bytetrack"))
    assert err.value.kind == "too_many" and "max_streams 2" in err.value.message
    with pytest.raises(StreamError) as err:
        reg.start(tracker_params("bytetrack"), stream_id="ts-seq-given")
    assert err.value.kind == "exists"

    reg.end(b.id)
    with pytest.raises(StreamError) as err:
        reg.get(b.id)
    assert err.value.kind == "ended"

    clock.t += 4.0
    reg.touch(a)
    assert reg.expire_idle() == [] and a.frames == 1
    clock.t += 5.5
    assert reg.expire_idle() == [a.id] and len(reg) == 0
    with pytest.raises(StreamError) as err:
        reg.get(a.id)
    assert err.value.kind == "expired" and "5 s" in err.value.message

    other = StreamRegistry(max_streams=2, idle_s=5.0)  # a restarted worker process: another epoch
    with pytest.raises(StreamError) as err:
        other.get(a.id)
    assert err.value.kind == "restarted"
    with pytest.raises(StreamError) as err:
        other.get("ts-seq-never-seen")
    assert err.value.kind == "unknown"
    restarted = reg.start(tracker_params("bytetrack"), stream_id=b.id)  # an ended id may start again
    assert reg.get(b.id) is restarted


def test_tracking_does_not_import_ultralytics():
    import subprocess
    import sys

    code = "import sys, handler.tracking; sys.exit('ultralytics' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0
