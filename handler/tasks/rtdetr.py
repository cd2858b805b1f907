"""RT-DETR detectors (``RTDETRDecoder`` head): the detection family with its own transform.

Parameters and JSON: those of ``detect.py`` (``iou`` is accepted and, as in Ultralytics, unused: the
decoder is NMS-free). Transform: :func:`handler.image.stretch.stretch`, ``RTDETRPredictor``'s
``scale_fill`` (the image stretched to ``imgsz``, no letterbox). Postprocessor:
:class:`export.rtdetr.RTDETRPostprocess`, the detection contract of ``export/postprocess.py``
(``detections, counts, masks`` with ``ncols = 6``).
"""

from __future__ import annotations

from handler.tasks.base import Stretched
from handler.tasks.detect import DetectTask


class RTDETRTask(Stretched, DetectTask):
    """The detection family's parameters, postprocessor contract and JSON, with the stretch transform."""


RTDETR = RTDETRTask("rtdetr")
