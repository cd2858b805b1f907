"""One tracked object (Ultralytics 8.4.190's ``STrack`` and ``BOTrack``) and the pool operations of
``trackers/utils/stracks.py``.

A track is built from one detection: ``xywh: [5]`` ``(cx, cy, w, h, idx)`` or, for OBB, ``[6]``
``(cx, cy, w, h, angle, idx)``, in pixels of the original image (angle in radians). The dtypes follow
Ultralytics' exactly (float32 detection boxes, float64 Kalman state), so the output is bit-equal.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from handler.tracking import matching
from handler.tracking.kalman import KalmanFilterXYAH


class TrackState(IntEnum):
    New = 0
    Tracked = 1
    Lost = 2
    Removed = 3


class Track:
    """ByteTrack's track: the Kalman state is ``(cx, cy, w / h, h)`` and its velocity."""

    def __init__(self, xywh: np.ndarray, score: np.float32, cls: np.float32) -> None:
        if len(xywh) == 6 and xywh[2] < xywh[3]:  # OBB long-edge form: swap w/h and turn by pi/2
            xywh = xywh[[0, 1, 3, 2, 4, 5]] + np.array([0, 0, 0, 0, np.pi / 2, 0])
        ltwh = np.copy(xywh[:4])
        ltwh[0] = xywh[0] - xywh[2] / 2
        ltwh[1] = xywh[1] - xywh[3] / 2
        self._tlwh = np.asarray(ltwh, dtype=np.float32)
        self.kalman_filter: KalmanFilterXYAH | None = None
        self.mean: np.ndarray | None = None  # float64[8]
        self.covariance: np.ndarray | None = None  # float64[8, 8]
        self.track_id = 0
        self.is_activated = False
        self.state = TrackState.New
        self.score = score
        self.tracklet_len = 0
        self.cls = cls
        self.idx = xywh[-1]
        self.angle = xywh[4] if len(xywh) == 6 else None
        self.start_frame = 0
        self.frame_id = 0

    # -- motion model (overridden by XywhTrack) ---------------------------------------------------
    velocity_dims_to_stop = (7,)  # zeroed before predicting a track that is not Tracked

    def convert_coords(self, tlwh: np.ndarray) -> np.ndarray:
        """``tlwh[4]`` -> the Kalman measurement ``(cx, cy, w / h, h)``."""
        ret = np.asarray(tlwh).copy()
        ret[:2] += ret[2:] / 2
        ret[2] /= ret[3]
        return ret

    @property
    def tlwh(self) -> np.ndarray:
        """Current box ``(left, top, w, h)``: the Kalman mean, or the detection before activation."""
        if self.mean is None:
            return self._tlwh.copy()
        ret = self.mean[:4].copy()
        ret[2] *= ret[3]
        ret[:2] -= ret[2:] / 2
        return ret

    # -- life cycle -------------------------------------------------------------------------------
    def activate(self, kalman_filter: KalmanFilterXYAH, frame_id: int, track_id: int) -> None:
        """Start the track (confirmed at once on the stream's first frame only)."""
        self.kalman_filter = kalman_filter
        self.track_id = track_id
        self.mean, self.covariance = self.kalman_filter.initiate(self.convert_coords(self._tlwh))
        self.tracklet_len = 0
        self.state = TrackState.Tracked
        if frame_id == 1:
            self.is_activated = True
        self.frame_id = frame_id
        self.start_frame = frame_id

    def re_activate(self, new_track: Track, frame_id: int) -> None:
        """A lost track matched again: Kalman update, back to Tracked, same ID."""
        self.mean, self.covariance = self.kalman_filter.update(self.mean, self.covariance,
                                                               self.convert_coords(new_track.tlwh))
        self.tracklet_len = 0
        self.state = TrackState.Tracked
        self.is_activated = True
        self.frame_id = frame_id
        self._take_detection(new_track)

    def update(self, new_track: Track, frame_id: int) -> None:
        """A tracked track matched: Kalman update with the detection."""
        self.frame_id = frame_id
        self.tracklet_len += 1
        self.mean, self.covariance = self.kalman_filter.update(self.mean, self.covariance,
                                                               self.convert_coords(new_track.tlwh))
        self.state = TrackState.Tracked
        self.is_activated = True
        self._take_detection(new_track)

    def _take_detection(self, new_track: Track) -> None:
        self.score = new_track.score
        self.cls = new_track.cls
        if self.angle is not None:  # keep the half-turn form nearest the track's angle, so it never flips
            self.angle = new_track.angle - np.pi * round((new_track.angle - self.angle) / np.pi)
        self.idx = new_track.idx

    def mark_lost(self) -> None:
        self.state = TrackState.Lost

    def mark_removed(self) -> None:
        self.state = TrackState.Removed

    @property
    def end_frame(self) -> int:
        return self.frame_id

    # -- boxes ------------------------------------------------------------------------------------
    @property
    def xyxy(self) -> np.ndarray:
        ret = self.tlwh
        ret[2:] += ret[:2]
        return ret

    @property
    def xywh(self) -> np.ndarray:
        ret = np.asarray(self.tlwh).copy()
        ret[:2] += ret[2:] / 2
        return ret

    @property
    def xywha(self) -> np.ndarray:
        return np.concatenate([self.xywh, self.angle[None]])

    @property
    def match_box(self) -> np.ndarray:
        """The box association compares: ``xywha[5]`` for OBB, else ``xyxy[4]``."""
        return self.xywha if self.angle is not None else self.xyxy

    @property
    def result(self) -> list:
        """``[x1, y1, x2, y2, track_id, score, cls, idx]``, or ``[cx, cy, w, h, angle, track_id, score, cls, idx]`` (OBB)."""
        coords = self.xyxy if self.angle is None else self.xywha
        return [*coords.tolist(), self.track_id, self.score, self.cls, self.idx]


class XywhTrack(Track):
    """BoT-SORT's track (``BOTrack`` without ReID): the Kalman state is ``(cx, cy, w, h)`` and its velocity."""

    velocity_dims_to_stop = (6, 7)

    def convert_coords(self, tlwh: np.ndarray) -> np.ndarray:
        ret = np.asarray(tlwh).copy()
        ret[:2] += ret[2:] / 2
        return ret

    @property
    def tlwh(self) -> np.ndarray:
        if self.mean is None:
            return self._tlwh.copy()
        ret = self.mean[:4].copy()
        ret[:2] -= ret[2:] / 2
        return ret


def multi_predict(tracks: list[Track], kalman_filter: KalmanFilterXYAH) -> None:
    """One Kalman prediction for every track; tracks not Tracked predict with their size velocity zeroed."""
    if not tracks:
        return
    multi_mean = np.asarray([t.mean for t in tracks])  # [N, 8]
    multi_covariance = np.asarray([t.covariance for t in tracks])  # [N, 8, 8]
    for i, t in enumerate(tracks):
        if t.state != TrackState.Tracked:
            for d in t.velocity_dims_to_stop:
                multi_mean[i][d] = 0
    multi_mean, multi_covariance = kalman_filter.multi_predict(multi_mean, multi_covariance)
    for t, mean, cov in zip(tracks, multi_mean, multi_covariance):
        t.mean, t.covariance = mean, cov


def multi_gmc(tracks: list[Track], H: np.ndarray) -> None:
    """Move tracks (xywh Kalman states) by the camera warp ``H: [2, 3]``: centres and their velocities
    by the rotation and the translation, sizes by ``abs(R)`` (or its scale, for OBB, whose angle turns)."""
    if not tracks:
        return
    multi_mean = np.asarray([t.mean for t in tracks])
    multi_covariance = np.asarray([t.covariance for t in tracks])
    R, obb = H[:2, :2], tracks[0].angle is not None
    R8x8 = np.kron(np.eye(4, dtype=np.float32), R)
    R8x8[2:4, 2:4] = R8x8[6:8, 6:8] = np.linalg.norm(R[:, 0]) * np.eye(2) if obb else np.abs(R)
    multi_mean = np.matmul(R8x8, multi_mean[..., None])[..., 0]
    multi_mean[:, :2] += H[:2, 2]
    multi_covariance = np.matmul(np.matmul(R8x8, multi_covariance), np.ascontiguousarray(R8x8.T))
    for t, mean, cov in zip(tracks, multi_mean, multi_covariance):
        t.mean, t.covariance = mean, cov
        t.angle = t.angle + np.arctan2(R[1, 0], R[0, 0]) if obb else None


def joint_tracks(a: list[Track], b: list[Track]) -> list[Track]:
    """``a`` then the tracks of ``b`` whose ID is not in ``a``."""
    a_ids = {t.track_id for t in a}
    return a + [t for t in b if t.track_id not in a_ids]


def sub_tracks(a: list[Track], b: list[Track]) -> list[Track]:
    """The tracks of ``a`` whose ID is not in ``b``."""
    b_ids = {t.track_id for t in b}
    return [t for t in a if t.track_id not in b_ids]


def remove_duplicate_tracks(a: list[Track], b: list[Track], dup_thresh: float = 0.15) -> tuple[list[Track], list[Track]]:
    """Pairs with IoU > 0.85 across the lists: drop the younger track (ties drop from ``a``)."""
    pdist = matching.iou_distance([t.match_box for t in a], [t.match_box for t in b])
    pairs = np.where(pdist < dup_thresh)
    dupa, dupb = [], []
    for p, q in zip(*pairs):
        timep = a[p].frame_id - a[p].start_frame
        timeq = b[q].frame_id - b[q].start_frame
        if timep > timeq:
            dupb.append(q)
        else:
            dupa.append(p)
    dupa_set, dupb_set = set(dupa), set(dupb)
    return ([t for i, t in enumerate(a) if i not in dupa_set],
            [t for i, t in enumerate(b) if i not in dupb_set])
