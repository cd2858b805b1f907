"""TorchServe handler for tests: :class:`YoloHandler` whose model load always fails with an I/O error.

A load error that a retry may fix (here an ``OSError``, as a flaky disk or network file system gives) fails the
worker: it dies, and TorchServe restarts it, for ever. A bad archive instead gets a worker that answers every
request with a 503 (``tests/test_load_failure.py``). This is how a model with no live worker is made
(``tests/test_wait_bound.py``). Packed by ``serving_support.wrapped_archive``.

Not a CUDA error: TorchServe 0.12 treats a ``RuntimeError`` that names CUDA at load time apart (a 507 load
answer, docs/torchserve.md), and this handler stands for a worker that simply dies.
"""

from __future__ import annotations

import errno

from handler.service import YoloService
from handler.yolo_handler import YoloHandler

MESSAGE = "Input/output error (simulated by tests/wrapped_handlers/failing_load_handler.py)"


def _io_error(*args, **kwargs):
    raise OSError(errno.EIO, MESSAGE)


class FailingLoadHandler(YoloHandler):
    def initialize(self, context) -> None:
        YoloService.from_dir = staticmethod(_io_error)  # in this worker process only
        super().initialize(context)
