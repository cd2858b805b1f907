"""Tracker parameters: Ultralytics 8.4.190's ``bytetrack.yaml`` / ``botsort.yaml``, as frozen values.

:func:`tracker_params` builds one from a tracker name and a mapping of overrides (the ``tracking:``
defaults of ``model-config.yaml`` merged with the options a client sends at stream start). Every key
is the YAML's own, so a copy of Ultralytics' file works unchanged. A wrong key or value raises
``ValueError`` that names the key and its valid range.

Differences from the YAML files, on purpose:
- ``with_reid`` must stay false (BoT-SORT runs without ReID, as with Ultralytics' default file);
  ``model`` (the ReID model) is accepted and ignored for the same reason.
- 8.4.190 has no ``frame_rate`` scaling: ``BYTETracker.__init__`` sets ``max_frames_lost =
  args.track_buffer`` (older releases used ``int(frame_rate / 30 * track_buffer)``), so neither do we.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Union

GMC_METHODS = ("sparseOptFlow", "orb", "sift", "ecc", "none")
TRACKER_NAMES = ("bytetrack", "botsort")


@dataclass(frozen=True)
class ByteTrackParams:
    """``bytetrack.yaml`` (Ultralytics 8.4.190); the defaults are that file's values."""

    track_high_thresh: float = 0.25  # first-stage association: detections with score >= this
    track_low_thresh: float = 0.1  # second stage: track_low_thresh < score < track_high_thresh
    new_track_thresh: float = 0.25  # an unmatched detection starts a track if score >= this
    track_buffer: int = 30  # frames a lost track is kept before it is removed
    match_thresh: float = 0.8  # first-stage cost limit (1 - IoU, score-fused when fuse_score)
    fuse_score: bool = True  # multiply IoU similarity by the detection score in the first stage

    @property
    def tracker_type(self) -> str:
        return "bytetrack"


@dataclass(frozen=True)
class BotSortParams(ByteTrackParams):
    """``botsort.yaml`` (Ultralytics 8.4.190) without ReID; the defaults are that file's values."""

    gmc_method: str = "sparseOptFlow"  # global motion compensation: sparseOptFlow | orb | sift | ecc | none
    proximity_thresh: float = 0.5  # used by ReID only (kept, validated, has no effect without ReID)
    appearance_thresh: float = 0.8  # used by ReID only (kept, validated, has no effect without ReID)
    with_reid: bool = False  # must be false

    @property
    def tracker_type(self) -> str:
        return "botsort"


TrackerParams = Union[ByteTrackParams, BotSortParams]

_UNIT_INTERVAL = ("track_high_thresh", "track_low_thresh", "new_track_thresh", "match_thresh",
                  "proximity_thresh", "appearance_thresh")
TRACK_BUFFER_MAX = 100_000
_IGNORED = ("tracker_type", "model")  # accepted so a copied YAML works; see the module docstring


def _number(key: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"tracker parameter {key} must be a number from 0 to 1, got {value!r}")
    return float(value)


def _integer(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"tracker parameter {key} must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if not isinstance(value, bool):
        raise ValueError(f"tracker parameter {key} must be true or false, got {value!r}")
    return value


def tracker_name(name: Any) -> str:
    """``"bytetrack"``, ``"botsort"`` (a ``.yaml`` suffix, as in ``model.track(tracker=...)``, is accepted)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if isinstance(key, str) and key.endswith(".yaml"):
        key = key[: -len(".yaml")]
    if key not in TRACKER_NAMES:
        raise ValueError(f"tracker must be one of {', '.join(TRACKER_NAMES)}, got {name!r}")
    return key


def tracker_params(name: Any, overrides: Mapping[str, Any] | None = None) -> TrackerParams:
    """Validated parameters of tracker ``name`` with ``overrides`` (keys of its YAML) applied.

    Raises ``ValueError`` naming the key and its valid range for an unknown key, a value of the wrong
    type or out of range, ``with_reid: true``, or a ``tracker_type`` that contradicts ``name``.
    """
    kind = tracker_name(name)
    cls = BotSortParams if kind == "botsort" else ByteTrackParams
    known = [f.name for f in fields(cls)]
    values: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if key == "tracker_type":
            if tracker_name(value) != kind:
                raise ValueError(f"tracker_type {value!r} contradicts tracker {kind!r}; drop it or write {kind!r}")
            continue
        if key in _IGNORED:
            continue
        if key not in known:
            raise ValueError(f"unknown {kind} parameter {key!r}; valid keys: {', '.join(known)}")
        if key in _UNIT_INTERVAL:
            values[key] = _number(key, value)
        elif key == "track_buffer":
            values[key] = _integer(key, value, 0, TRACK_BUFFER_MAX)
        elif key == "fuse_score":
            values[key] = _boolean(key, value)
        elif key == "with_reid":
            if _boolean(key, value):
                raise ValueError("tracker parameter with_reid must be false: BoT-SORT is served without ReID")
            values[key] = False
        elif key == "gmc_method":
            method = "none" if value is None or value == "None" else value
            if method not in GMC_METHODS:
                raise ValueError(f"tracker parameter gmc_method must be one of {', '.join(GMC_METHODS)}, got {value!r}")
            values[key] = method
    return cls(**values)
