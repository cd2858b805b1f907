"""TorchServe handler for tests: :class:`YoloHandler` with every inference batch ``DELAY_S`` seconds slower.

It makes a model version slower than any fixed drain delay, so a rollout test can only pass when the rollout
waits for what is queued (``tests/test_rollout.py``). Packed into a ``.mar`` by
``serving_support.wrapped_archive`` as the archive's handler; the describe request is not delayed.
"""

from __future__ import annotations

import time

from handler.yolo_handler import YoloHandler

DELAY_S = 1.0


class SlowYoloHandler(YoloHandler):
    def handle(self, data: list, context) -> list[str]:
        try:
            describe = context.get_request_header(0, "describe") == "True"
        except (AttributeError, IndexError, KeyError, TypeError):
            describe = False
        if not describe:
            time.sleep(DELAY_S)
        return super().handle(data, context)
