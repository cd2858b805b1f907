"""Sending a batch: worker threads, each with its own keep-alive connection, that read an image, send
it, retry what a busy or restarting server answers, and hand one :class:`Outcome` per image back to
the caller's thread (which writes the outputs and the progress bar; nothing else is shared).

* **Retries**: HTTP 502/503/504 (TorchServe answers 503 while its queue is full or a worker restarts),
  connection errors and timeouts are retried ``retries`` times, after 0.5, 1, 2, 4, 8, 8, ... s (each
  randomised by up to half, so that the threads do not retry in step).
* **Keys**: one :class:`tools.client.KeyRing` for all threads: an expired key is renewed once, as the
  single-image client does.
* **Per-image errors** (any other answer than 200, an unreadable file, a picture that cannot be saved)
  become outcomes with the status and the message; the run goes on.
* **The run stops** (:attr:`Runner.stopped` says why) when going on cannot help: an image still fails
  after its retries (the server is gone or overloaded), the key cannot be renewed, the server refuses the
  request options (400 ``invalid_parameter``: the same for every image) or has no such model (404).
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np
import requests

from tools.client import ClientError, KeyRing, draw

RETRY_STATUSES = frozenset({502, 503, 504})
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
# Answers that do not depend on the image: every image would get them, so the run stops at the first.
NO_SUCH_MODEL = frozenset({404, 405})
# What cv2.imwrite can write (an image of another suffix is saved with .jpg added).
WRITABLE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff"})


@dataclass(frozen=True)
class Outcome:
    """One image's result: its answer (HTTP 200), or why it has none."""

    name: str
    answer: dict | None
    status: int | None = None  # the HTTP status of a failed image; None when no answer came (file unreadable)
    error_type: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.answer is not None


@dataclass(frozen=True)
class Request:
    """What every image is sent with."""

    url: str
    params: dict
    timeout: float = 120.0
    retries: int = 5


class _Stop(Exception):
    """Going on cannot help; the message says why."""


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retry ``attempt + 1`` (0-based ``attempt``), randomised down by up to half."""
    return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2**attempt) * (0.5 + random.random() / 2)


def saved_path(save_dir: Path, name: str) -> Path:
    """Where the annotated picture of the image named ``name`` goes."""
    path = save_dir / name
    return path if path.suffix.lower() in WRITABLE_SUFFIXES else path.with_name(path.name + ".jpg")


def error_of(r: requests.Response) -> tuple[str, str]:
    """(type, message) of an error answer: the handler's ``{"error": {...}}``, TorchServe's
    ``{"code", "type", "message"}``, or the text."""
    try:
        body = r.json()
    except ValueError:
        text = r.text.strip()
        return "http", text.splitlines()[0][:300] if text else (r.reason or "")
    error = body.get("error", body) if isinstance(body, dict) else {}
    return str(error.get("type", "http")), str(error.get("message", r.text[:300]))


class Runner:
    """Sends images with ``workers`` threads; see the module doc."""

    def __init__(self, keys: KeyRing, request: Request, workers: int, name_of: Callable[[Path], str], save_dir: Path | None = None) -> None:
        self.keys, self.request, self.workers, self.name_of, self.save_dir = keys, request, workers, name_of, save_dir
        self.stopped: str | None = None  # why the run stopped early
        self._stop = threading.Event()
        self._local = threading.local()

    def run(self, paths: Iterable[Path], on_outcome: Callable[[Outcome], None]) -> None:
        """Send every image of ``paths``; ``on_outcome`` is called in this thread, once per finished image,
        in the order they finish. Returns when all are done or the run stopped (:attr:`stopped`), after
        handing over every image that finished. Ctrl-C, or an exception of ``on_outcome``, stops at once:
        an image answered but not handed over yet is sent again by the next run."""
        pending = iter(paths)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="batch")
        running: set[Future] = set()
        try:
            while True:
                while not self._stop.is_set() and len(running) < 2 * self.workers:  # a few queued: no thread waits
                    path = next(pending, None)
                    if path is None:
                        break
                    running.add(pool.submit(self._one, path))
                if not running:
                    return
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    outcome = f.result()
                    if outcome is not None:
                        on_outcome(outcome)
        finally:
            self._stop.set()  # threads still sending (only after Ctrl-C) end without handing anything over
            pool.shutdown(wait=False, cancel_futures=True)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _one(self, path: Path) -> Outcome | None:
        """One image, start to end; None when the run stopped before or while it was sent."""
        if self._stop.is_set():
            return None
        name = self.name_of(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            return Outcome(name, None, None, "unreadable_file", f"cannot read {path}: {e.strerror or e}")
        try:
            r = self._send(data)
        except (_Stop, ClientError) as e:
            if self.stopped is None:
                self.stopped = str(e)
            self._stop.set()
            return None
        if r is None:
            return None
        if r.status_code != 200:
            kind, message = error_of(r)
            return Outcome(name, None, r.status_code, kind, message)
        try:
            answer = r.json()
        except ValueError:
            return Outcome(name, None, r.status_code, "not_json", f"the answer is not JSON: {r.text[:200]!r}")
        if self.save_dir is not None:
            try:
                problem = self._save(data, answer, saved_path(self.save_dir, name))
            except (cv2.error, OSError, KeyError, TypeError, ValueError) as e:  # an answer our drawing does not know
                problem = f"could not draw the answer: {e}"
            if problem:
                return Outcome(name, None, None, "save_failed", problem)
        return Outcome(name, answer)

    def _send(self, data: bytes) -> requests.Response | None:
        """The answer to ``data`` after retries; None when the run stopped meanwhile; raises :class:`_Stop`."""
        req, last = self.request, ""
        for attempt in range(req.retries + 1):
            if attempt and self._stop.wait(backoff_s(attempt - 1)):
                return None
            try:
                r = self.keys.predict(data, req.url, req.params, req.timeout, self._session())
            except requests.Timeout:
                last = f"no answer within {req.timeout:g} s (--timeout)"
                continue
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
                last = f"connection failed ({type(e).__name__})"
                continue
            except requests.RequestException as e:  # a URL that cannot be sent to at all
                raise _Stop(f"cannot send to {req.url}: {e}") from None
            if r.status_code in RETRY_STATUSES:
                last = f"HTTP {r.status_code}: {error_of(r)[1]}"
                continue
            kind, message = error_of(r) if r.status_code != 200 else ("", "")
            if r.status_code in NO_SUCH_MODEL:
                raise _Stop(f"{req.url} answers HTTP {r.status_code}: {message}; is the URL right (--url)?")
            if kind == "invalid_parameter":
                raise _Stop(f"the server refuses the request options: {message}")
            return r
        raise _Stop(f"the server at {req.url} stopped answering: {last}, also after {req.retries} retries")

    @staticmethod
    def _save(data: bytes, answer: dict, path: Path) -> str | None:
        """Draw ``answer`` on the image and write it; the problem, or None."""
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            return "the client's OpenCV cannot decode the image to draw on it"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), draw(image, answer)):
            return f"could not write {path}"
        return None
