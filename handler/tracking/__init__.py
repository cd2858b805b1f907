"""Multi-object tracking for video streams: ByteTrack and BoT-SORT as Ultralytics 8.4.190 runs them.

Pure numpy + OpenCV + ``lap`` (and torch for the OBB probIoU); no Ultralytics import. One tracker per
stream::

    params = tracker_params("bytetrack", {"track_buffer": 60})   # ValueError names a bad key
    tracker = create_tracker(params)
    frame_tracks = tracker.update(FrameDetections(boxes, scores, classes), frame_bgr)
    frame_tracks.rows   # float32[M, 8] [x1, y1, x2, y2, track_id, score, cls, idx]

:class:`StreamRegistry` holds a worker's streams (one tracker each) and drops them on end or idle expiry.
"""

from handler.tracking.params import (
                                     GMC_METHODS,
                                     TRACKER_NAMES,
                                     BotSortParams,
                                     ByteTrackParams,
                                     TrackerParams,
                                     tracker_name,
                                     tracker_params,
)
from handler.tracking.registry import Stream, StreamError, StreamRegistry
from handler.tracking.tracker import BotSortTracker, ByteTracker, FrameDetections, FrameTracks, create_tracker

__all__ = [
    "BotSortParams", "BotSortTracker", "ByteTrackParams", "ByteTracker", "FrameDetections", "FrameTracks", "GMC_METHODS",
    "Stream", "StreamError", "StreamRegistry", "TRACKER_NAMES", "TrackerParams", "create_tracker", "tracker_name", "tracker_params",
]
