"""Baseline "T": Ultralytics ``YOLO`` loaded inside a TorchServe handler.

This is the approach of pytorch/serve's official example ``examples/object_detector/yolo/yolov8``
(``custom_handler.py``), written here for the benchmark, not copied: the archive's serialized file
is the Ultralytics ``.pt`` checkpoint, ``initialize`` loads it with ``ultralytics.YOLO``, each
request is decoded with PIL and transformed with ``Resize(640) -> CenterCrop(640) -> ToTensor()``
(the example's ``image_processing``), the batch is stacked and passed to ``YOLO.__call__`` (which
runs Ultralytics' own predict: its preprocess, the PyTorch model, NMS).

Two differences from the example, both to make the comparison fair to it, not to us:

- The example subclasses TorchServe's ``ObjectDetector`` (a ``VisionHandler``), which imports
  ``captum``, not a dependency here; this subclasses ``BaseHandler`` and does the same decode.
- The example answers with per-class counts; this answers with the same kind of JSON as our handler
  (boxes, scores, class ids and names, keypoints), so both servers do comparable work per request.
  Boxes are in the 640x640 centre crop's pixels, as the example's model sees them (the crop loses
  the image's edges; that is the example's behaviour, kept).

Used only by ``python -m bench``; never part of the served product.
"""

from __future__ import annotations

import io
import logging
import os

import torch
from PIL import Image
from torchvision import transforms
from ts.torch_handler.base_handler import BaseHandler
from ultralytics import YOLO

logger = logging.getLogger(__name__)

IMG_SIZE = 640


class UltralyticsBaselineHandler(BaseHandler):
    image_processing = transforms.Compose([transforms.Resize(IMG_SIZE), transforms.CenterCrop(IMG_SIZE), transforms.ToTensor()])

    def initialize(self, context) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        weights = os.path.join(context.system_properties["model_dir"], context.manifest["model"]["serializedFile"])
        self.model = YOLO(weights)
        self.model.to(self.device)
        self.context = context
        self.initialized = True
        logger.info("baseline: YOLO(%s) on %s, torch threads %d", weights, self.device, torch.get_num_threads())

    def preprocess(self, data: list) -> torch.Tensor:
        """Rows -> ``float32[B, 3, 640, 640]`` RGB 0..1, as the example's ``VisionHandler.preprocess``."""
        images = []
        for row in data:
            body = row.get("data") or row.get("body")
            image = Image.open(io.BytesIO(body)).convert("RGB")
            images.append(self.image_processing(image))
        return torch.stack(images).to(self.device)

    def inference(self, batch: torch.Tensor, *args, **kwargs) -> list:
        return self.model(batch, verbose=False)

    def postprocess(self, results: list) -> list[dict]:
        out = []
        for r in results:
            boxes = r.boxes
            dets = []
            kpts = r.keypoints.data.tolist() if r.keypoints is not None else None
            for i, (box, score, cls) in enumerate(zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist())):
                det = {
                    "box": [round(v, 2) for v in box],
                    "score": round(score, 4),
                    "class_id": int(cls),
                    "class_name": r.names[int(cls)],
                }
                if kpts is not None:
                    det["keypoints"] = [[round(v, 2) for v in k[:2]] + [round(k[2], 4) if len(k) > 2 else 1.0] for k in kpts[i]]
                dets.append(det)
            out.append({"detections": dets})
        return out
