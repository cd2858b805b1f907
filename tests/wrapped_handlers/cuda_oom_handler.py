"""TorchServe handler for tests: :class:`YoloHandler` whose model load always fails as CUDA out of memory does.

A load that a retry may fix fails the worker (TorchServe restarts it, for ever), unlike a bad archive, which
the handler answers with a 503. This is how a model with no live worker is made on a CPU machine
(``tests/test_wait_bound.py``). Packed by ``serving_support.wrapped_archive``.
"""

from __future__ import annotations

import torch

from handler.service import YoloService
from handler.yolo_handler import YoloHandler

MESSAGE = "CUDA out of memory. Tried to allocate 20.00 MiB (simulated by tests/wrapped_handlers/cuda_oom_handler.py)"


def _out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError(MESSAGE)


class CudaOomHandler(YoloHandler):
    def initialize(self, context) -> None:
        YoloService.from_dir = staticmethod(_out_of_memory)  # in this worker process only
        super().initialize(context)
