"""RT-DETR detectors (``RTDETRDecoder`` head): the detection family with its own transform.

Parameters and JSON: those of ``detect.py`` (``iou`` is accepted and, as in Ultralytics, unused: the
decoder is NMS-free). Transform: :func:`handler.image.stretch.stretch`, ``RTDETRPredictor``'s
``scale_fill`` (the image stretched to ``imgsz``, no letterbox). Postprocessor:
:class:`export.rtdetr.RTDETRPostprocess`, the detection contract of ``export/postprocess.py``
(``detections, counts, masks`` with ``ncols = 6``).
"""

from __future__ import annotations

from handler.image.stretch import stretch
from handler.tasks.base import ImageTransform
from handler.tasks.detect import DetectTask


class RTDETRTask(DetectTask):
    def transform(self, imgsz, stride: int, letterbox_mode: str | None) -> ImageTransform:
        """Every input gets the shape ``imgsz``; ``letterbox_mode`` is not used."""
        return lambda image: stretch(image, imgsz)


RTDETR = RTDETRTask("rtdetr")
