"""One worker's video streams: a tracker per stream id, dropped on end, on idle expiry, and (by
construction) when the worker restarts, since the registry lives in the worker process.

TorchServe runs one batch at a time per worker, so the registry needs no lock. It has no timer
thread either: :meth:`StreamRegistry.expire_idle` runs at the start of each batch.

A stream id that the registry does not hold is an error that says why, as :class:`StreamError` with
``kind``:
- ``"ended"``: the client ended it; ``"expired"``: idle longer than ``idle_s``;
- ``"restarted"``: the id was issued by an earlier process of this worker (ids issued here start
  with the process's ``epoch``), so the worker restarted and the stream's tracks are lost;
- ``"unknown"``: never started on this worker;
- ``"too_many"``: starting one more would exceed ``max_streams``;
- ``"exists"``: starting a stream whose id is already open.
The handler maps ``kind`` to an HTTP status in one place (``handler/errors.py``).
"""

from __future__ import annotations

import itertools
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from handler.tracking.params import TrackerParams
from handler.tracking.tracker import ByteTracker, create_tracker

CLOSED_MEMORY = 1000  # ended/expired ids remembered, to say "ended"/"expired" instead of "unknown"
_OUR_ID = re.compile(r"^trk-([0-9a-f]{12})-\d+$")


class StreamError(Exception):
    """A request named a stream this worker cannot continue (see the module docstring for ``kind``)."""

    def __init__(self, kind: str, stream_id: str | None, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.stream_id = stream_id
        self.message = message


@dataclass
class Stream:
    """One open stream: its tracker, the parameters it started with, and its use."""

    id: str
    params: TrackerParams
    tracker: ByteTracker
    last_used: float  # clock seconds of the last frame (or the start)
    frames: int = 0


class StreamRegistry:
    """The streams of one worker process."""

    def __init__(self, max_streams: int, idle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {max_streams}")
        if idle_s <= 0:
            raise ValueError(f"idle_s must be positive, got {idle_s}")
        self.max_streams = max_streams
        self.idle_s = idle_s
        self.clock = clock
        self.epoch = uuid.uuid4().hex[:12]  # this process; ids issued here carry it
        self._counter = itertools.count(1)
        self._open: dict[str, Stream] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()  # id -> "ended" | "expired"

    def __len__(self) -> int:
        return len(self._open)

    def new_id(self) -> str:
        """A fresh stream id, ``trk-<epoch>-<n>``."""
        return f"trk-{self.epoch}-{next(self._counter)}"

    def start(self, params: TrackerParams, stream_id: str | None = None) -> Stream:
        """Open a stream with a fresh tracker (track IDs from 1). ``stream_id`` None: issue one here
        (TorchServe sequence batching hands out its own ids; pass those)."""
        sid = self.new_id() if stream_id is None else stream_id
        if sid in self._open:
            raise StreamError("exists", sid, f"stream {sid!r} is already open; end it first or continue it")
        if len(self._open) >= self.max_streams:
            raise StreamError("too_many", sid, f"this worker already serves {len(self._open)} streams "
                              f"(max_streams {self.max_streams}); end one or wait until one has been idle {self.idle_s:g} s")
        self._closed.pop(sid, None)
        stream = Stream(sid, params, create_tracker(params), last_used=self.clock())
        self._open[sid] = stream
        return stream

    def get(self, stream_id: str) -> Stream:
        """The open stream ``stream_id``, or :class:`StreamError` saying why it is not open."""
        stream = self._open.get(stream_id)
        if stream is not None:
            return stream
        closed = self._closed.get(stream_id)
        if closed == "ended":
            raise StreamError("ended", stream_id, f"stream {stream_id!r} was ended; start a new stream")
        if closed == "expired":
            raise StreamError("expired", stream_id, f"stream {stream_id!r} expired after {self.idle_s:g} s without "
                              "a frame; its tracks are gone: start a new stream")
        m = _OUR_ID.match(stream_id)
        if m and m.group(1) != self.epoch:
            raise StreamError("restarted", stream_id, f"stream {stream_id!r} was lost: the worker restarted since it "
                              "started, and its tracks are gone: start a new stream")
        raise StreamError("unknown", stream_id, f"unknown stream {stream_id!r} (never started on this worker, or the "
                          "worker restarted since): start a new stream")

    def touch(self, stream: Stream) -> None:
        """Record one processed frame now."""
        stream.frames += 1
        stream.last_used = self.clock()

    def end(self, stream_id: str) -> Stream:
        """Close the stream and drop its tracker; later frames get ``kind="ended"``."""
        stream = self.get(stream_id)
        del self._open[stream_id]
        self._remember(stream_id, "ended")
        return stream

    def expire_idle(self) -> list[str]:
        """Drop streams idle longer than ``idle_s``; returns their ids."""
        now = self.clock()
        gone = [sid for sid, s in self._open.items() if now - s.last_used > self.idle_s]
        for sid in gone:
            del self._open[sid]
            self._remember(sid, "expired")
        return gone

    def _remember(self, stream_id: str, why: str) -> None:
        self._closed[stream_id] = why
        self._closed.move_to_end(stream_id)
        while len(self._closed) > CLOSED_MEMORY:
            self._closed.popitem(last=False)
