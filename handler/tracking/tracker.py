"""ByteTrack and BoT-SORT (without ReID) for one stream, as Ultralytics 8.4.190's ``BYTETracker`` and
``BOTSORT`` (``trackers/byte_tracker.py``, ``trackers/bot_sort.py``), without importing Ultralytics.

Per frame, :meth:`ByteTracker.update` takes the frame's :class:`FrameDetections` (after NMS, in pixels of
the original image) and the frame itself (BoT-SORT's motion compensation reads it), and returns
:class:`FrameTracks`: the rows Ultralytics' ``tracker.update`` returns. Track IDs count from 1 per
tracker instance (8.4.190 gives each tracker its own counter too), so one tracker per stream gives
the IDs of ``YOLO(weights).track(frame, persist=True)`` on a fresh model.

The frame's life cycle, for each tracker:
1. split detections: high (score >= track_high_thresh) and low (track_low_thresh < score < high);
   boxes with zero width or height are dropped;
2. Kalman-predict tracked and lost tracks; BoT-SORT warps them by the camera motion;
3. first association: those tracks with high detections, cost ``1 - IoU`` (times the score when
   fuse_score), limit match_thresh;
4. second association: the still unmatched Tracked tracks with low detections, ``1 - IoU``, limit 0.5;
   tracks left over become Lost;
5. unconfirmed tracks (born on the previous frame) with the remaining high detections, limit 0.7;
   unmatched ones are removed;
6. remaining high detections with score >= new_track_thresh start tracks (confirmed on frame 1 only,
   else on their second frame);
7. lost tracks older than track_buffer frames are removed; pools merged and de-duplicated.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from handler.tracking import matching
from handler.tracking.gmc import GlobalMotion
from handler.tracking.kalman import KalmanFilterXYAH, KalmanFilterXYWH
from handler.tracking.params import BotSortParams, ByteTrackParams, TrackerParams
from handler.tracking.track import (Track, TrackState, XywhTrack, joint_tracks, multi_gmc, multi_predict,
                                    remove_duplicate_tracks, sub_tracks)

REMOVED_BUFFER = 1000  # removed tracks remembered (Ultralytics' merge_track_pools default)


@dataclass(frozen=True)
class FrameDetections:
    """One frame's detections, in pixels of the original image.

    - ``boxes: float32[N, 4]`` xyxy, or ``float32[N, 5]`` xywhr (OBB: centre, size, angle in radians);
    - ``scores: float32[N]``; ``classes: float32[N]`` (class ids);
    - ``rows: int64[N]``: the caller's row index of each detection (its keypoints, mask, ...). The
      output's ``idx`` column is this index. ``None`` means ``0..N-1``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    rows: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.ndim != 2 or self.boxes.shape[1] not in (4, 5):
            raise ValueError(f"boxes must be [N, 4] xyxy or [N, 5] xywhr, got shape {self.boxes.shape}")
        if self.scores.shape != (n,) or self.classes.shape != (n,) or (self.rows is not None and self.rows.shape != (n,)):
            raise ValueError("scores, classes and rows must be [N] with N = len(boxes)")

    @property
    def is_obb(self) -> bool:
        return self.boxes.shape[1] == 5

    @property
    def xywh(self) -> np.ndarray:
        """``float32[N, 4|5]``: ``(cx, cy, w, h)`` (Ultralytics' ``Boxes.xywh``), or xywhr as given (OBB)."""
        b = np.asarray(self.boxes, dtype=np.float32)
        if self.is_obb:
            return b
        y = np.empty_like(b)
        y[:, 0] = (b[:, 0] + b[:, 2]) / 2
        y[:, 1] = (b[:, 1] + b[:, 3]) / 2
        y[:, 2] = b[:, 2] - b[:, 0]
        y[:, 3] = b[:, 3] - b[:, 1]
        return y

    @property
    def xyxy(self) -> np.ndarray:
        """``float32[N, 4]``: the boxes, or the enclosing axis-aligned box of each OBB (``OBB.xyxy``)."""
        b = np.asarray(self.boxes, dtype=np.float32)
        if not self.is_obb:
            return b
        ctr, w, h, angle = b[:, :2], b[:, 2:3], b[:, 3:4], b[:, 4:5]
        cos, sin = np.cos(angle), np.sin(angle)
        vec1 = np.concatenate([w / 2 * cos, w / 2 * sin], -1)
        vec2 = np.concatenate([-h / 2 * sin, h / 2 * cos], -1)
        corners = np.stack([ctr + vec1 + vec2, ctr + vec1 - vec2, ctr - vec1 - vec2, ctr - vec1 + vec2], -2)
        x, y = corners[..., 0], corners[..., 1]
        return np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], -1)


@dataclass(frozen=True)
class FrameTracks:
    """What one frame's update returns.

    - ``rows: float32[M, 8]`` ``[x1, y1, x2, y2, track_id, score, cls, idx]``, or ``float32[M, 9]``
      ``[cx, cy, w, h, angle, track_id, score, cls, idx]`` for OBB: the confirmed tracks seen this
      frame, in Ultralytics' order; the box is the Kalman estimate after the update, not clipped to
      the image (:meth:`clipped` gives what ``results.boxes`` shows after ``track``); ``score`` and
      ``cls`` are the matched detection's, ``idx`` its row (``FrameDetections.rows``).
    - ``pending``: a track was born this frame and is not yet confirmed.

    What ``YOLO.track`` then shows for the frame (``ultralytics/trackers/track.py``,
    ``on_predict_postprocess_end``): if ``rows`` is non-empty, the detections ``rows[:, -1]`` in that
    order with the tracker's boxes and IDs; if ``rows`` is empty and ``pending``, no detection; if
    ``rows`` is empty and not ``pending``, the frame's detections unchanged and without track IDs
    (for instance a frame with only low-score detections and nothing to continue).
    """

    rows: np.ndarray
    pending: bool

    def clipped(self, height: int, width: int) -> np.ndarray:
        """``rows`` with the xyxy boxes clipped to the image ``[0, width] x [0, height]``: the boxes
        ``YOLO.track`` shows (``Results.update`` clips them; the tracker's own state is not clipped).
        OBB rows are returned as they are (Ultralytics does not clip those either)."""
        out = self.rows.copy()
        if out.shape[1] == 8:
            out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
            out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
        return out

    @property
    def shows_untracked_detections(self) -> bool:
        """True when Ultralytics would show the frame's detections as they are, without IDs."""
        return len(self.rows) == 0 and not self.pending


class ByteTracker:
    """ByteTrack over one stream. Not thread-safe: one instance per stream, frames in order."""

    track_class: type[Track] = Track

    def __init__(self, params: ByteTrackParams) -> None:
        self.params = params
        self.max_frames_lost = params.track_buffer
        self.reset()

    def reset(self) -> None:
        """Forget every track and restart the frame count and the IDs at 1."""
        self.tracked: list[Track] = []
        self.lost: list[Track] = []
        self.removed: list[Track] = []
        self.frame_id = 0
        self.kalman_filter = self._kalman_filter()
        self._ids = itertools.count(1)

    def _kalman_filter(self) -> KalmanFilterXYAH:
        return KalmanFilterXYAH()

    # -- the frame --------------------------------------------------------------------------------
    def update(self, detections: FrameDetections, frame: np.ndarray | None = None) -> FrameTracks:
        """Advance by one frame. ``frame: uint8[H, W, 3]`` BGR, the full original image (BoT-SORT's GMC)."""
        self.frame_id += 1
        activated: list[Track] = []
        refind: list[Track] = []
        lost: list[Track] = []
        removed: list[Track] = []
        p = self.params

        scores = np.asarray(detections.scores, dtype=np.float32)
        classes = np.asarray(detections.classes, dtype=np.float32)
        xywh = detections.xywh
        valid = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)  # h = 0 would give an infinite aspect ratio
        mask_high = valid & (scores >= p.track_high_thresh)
        mask_low = valid & (scores > p.track_low_thresh) & (scores < p.track_high_thresh)
        rows = np.arange(len(scores)) if detections.rows is None else np.asarray(detections.rows)
        high = self._new_tracks(xywh, scores, classes, mask_high, rows)
        low = self._new_tracks(xywh, scores, classes, mask_low, rows)

        unconfirmed = [t for t in self.tracked if not t.is_activated]
        confirmed = [t for t in self.tracked if t.is_activated]
        pool = joint_tracks(confirmed, self.lost)
        multi_predict(pool, self.kalman_filter)
        self._compensate_motion(pool, unconfirmed, frame, detections.xyxy[mask_high])

        # 1. tracked + lost tracks with the high detections
        dists = self._distances(pool, high)
        matches, u_track, u_detection = matching.linear_assignment(dists, thresh=p.match_thresh)
        self._apply_matches(matches, pool, high, activated, refind)

        # 2. the remaining Tracked tracks with the low detections (IoU only, as in the ByteTrack paper)
        remaining = [pool[i] for i in u_track if pool[i].state == TrackState.Tracked]
        if remaining and low:
            dists = matching.iou_distance([t.match_box for t in remaining], [t.match_box for t in low])
            matches, u_remaining, _ = matching.linear_assignment(dists, thresh=0.5)
            self._apply_matches(matches, remaining, low, activated, refind)
        else:
            u_remaining = list(range(len(remaining)))
        for i in u_remaining:
            remaining[i].mark_lost()
            lost.append(remaining[i])

        # 3. unconfirmed tracks with the high detections left over
        left = [high[i] for i in u_detection]
        if unconfirmed:
            dists = self._distances(unconfirmed, left)
            matches, u_unconfirmed, u_left = matching.linear_assignment(dists, thresh=0.7)
            for it, idet in matches:
                unconfirmed[it].update(left[idet], self.frame_id)
                activated.append(unconfirmed[it])
            for it in u_unconfirmed:
                unconfirmed[it].mark_removed()
                removed.append(unconfirmed[it])
        else:
            u_left = list(range(len(left)))

        # 4. births
        for i in u_left:
            track = left[i]
            if track.score < p.new_track_thresh:
                continue
            track.activate(self.kalman_filter, self.frame_id, next(self._ids))
            activated.append(track)

        # 5. deaths
        for track in self.lost:
            if self.frame_id - track.end_frame > self.max_frames_lost:
                track.mark_removed()
                removed.append(track)

        self._merge(activated, refind, lost, removed)
        out = [t.result for t in self.tracked if t.is_activated]
        width = 9 if detections.is_obb else 8
        return FrameTracks(rows=np.asarray(out, dtype=np.float32).reshape(-1, width),
                           pending=any(not t.is_activated for t in self.tracked))

    # -- steps ------------------------------------------------------------------------------------
    def _new_tracks(self, xywh: np.ndarray, scores: np.ndarray, classes: np.ndarray, mask: np.ndarray,
                    rows: np.ndarray) -> list[Track]:
        """FrameDetections selected by ``mask`` as unstarted tracks; ``idx`` is the caller's row."""
        sel = np.flatnonzero(mask)
        if len(sel) == 0:
            return []
        boxes = np.concatenate([xywh[sel], np.arange(len(sel)).reshape(-1, 1)], axis=-1)  # float64, as parse_bboxes
        tracks = [self.track_class(b, s, c) for b, s, c in zip(boxes, scores[sel], classes[sel])]
        for track, i in zip(tracks, sel):
            track.idx = rows[i]
        return tracks

    def _compensate_motion(self, pool: list[Track], unconfirmed: list[Track], frame: np.ndarray | None,
                           high_xyxy: np.ndarray) -> None:
        """ByteTrack has no camera-motion compensation."""

    def _distances(self, tracks: list[Track], detections: list[Track]) -> np.ndarray:
        dists = matching.iou_distance([t.match_box for t in tracks], [d.match_box for d in detections])
        if self.params.fuse_score:
            dists = matching.fuse_score(dists, np.array([d.score for d in detections]))
        return dists

    def _apply_matches(self, matches, tracks: list[Track], detections: list[Track], activated: list[Track],
                       refind: list[Track]) -> None:
        for it, idet in matches:
            track, det = tracks[it], detections[idet]
            if track.state == TrackState.Tracked:
                track.update(det, self.frame_id)
                activated.append(track)
            else:
                track.re_activate(det, self.frame_id)
                refind.append(track)

    def _merge(self, activated: list[Track], refind: list[Track], lost: list[Track], removed: list[Track]) -> None:
        """End-of-frame bookkeeping (``merge_track_pools``)."""
        self.tracked = [t for t in self.tracked if t.state == TrackState.Tracked]
        self.tracked = joint_tracks(self.tracked, activated)
        self.tracked = joint_tracks(self.tracked, refind)
        self.lost = sub_tracks(self.lost, self.tracked)
        self.lost.extend(lost)
        self.lost = sub_tracks(self.lost, self.removed)
        self.tracked, self.lost = remove_duplicate_tracks(self.tracked, self.lost)
        self.removed.extend(removed)
        if len(self.removed) > REMOVED_BUFFER:
            self.removed = self.removed[-REMOVED_BUFFER:]


class BotSortTracker(ByteTracker):
    """BoT-SORT without ReID: ByteTrack with an xywh Kalman state and camera-motion compensation."""

    track_class = XywhTrack

    def __init__(self, params: BotSortParams) -> None:
        self.gmc = GlobalMotion(method=params.gmc_method)
        super().__init__(params)

    def reset(self) -> None:
        super().reset()
        self.gmc.reset()

    def _kalman_filter(self) -> KalmanFilterXYWH:
        return KalmanFilterXYWH()

    def _compensate_motion(self, pool: list[Track], unconfirmed: list[Track], frame: np.ndarray | None,
                           high_xyxy: np.ndarray) -> None:
        if self.gmc.method is None or frame is None:
            return
        try:
            warp = self.gmc.apply(frame, high_xyxy)
        except Exception:  # as Ultralytics: a failed estimate means no motion
            warp = np.eye(2, 3)
        multi_gmc(pool, warp)
        multi_gmc(unconfirmed, warp)


def create_tracker(params: TrackerParams) -> ByteTracker:
    """A fresh tracker for one stream (IDs from 1)."""
    return BotSortTracker(params) if isinstance(params, BotSortParams) else ByteTracker(params)
