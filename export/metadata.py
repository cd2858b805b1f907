"""The self-description embedded in both TorchScript files (``_extra_files["metadata.json"]``) and
written beside them as ``metadata.json``. The handler reads and checks it at load time."""

from __future__ import annotations

import json

import torch

from export.checkpoint import LoadedModel
from export.postprocess import ANGLE_DECODE_NONE, ANGLE_DECODE_OBB26, CONTRACT_VERSION, KPT_DECODE_POSE26
from handler.aoti_backbone import AOTI_BACKBONE_FILE, AOTI_FORMAT, TORCHSCRIPT_FORMAT
from handler.pipeline import BACKBONE_FILE


def build_metadata(loaded: LoadedModel, name: str, imgsz: list[int], letterbox: str, backbone_format: str = TORCHSCRIPT_FORMAT) -> dict:
    """Everything a server needs to know about the exported pair, JSON-serialisable.

    ``format`` names how the backbone is stored (``torchscript``: ``backbone.pt``; ``aoti``:
    ``backbone.pt2``) and ``backbone`` its file; the handler loads whichever they name."""
    import ultralytics

    return {
        "contract": CONTRACT_VERSION,
        "name": name,
        "task": loaded.task,
        "names": loaded.names,  # a list: index = class id (JSON object keys would become strings)
        "nc": loaded.nc,
        "kpt_shape": list(loaded.kpt_shape) if loaded.kpt_shape else None,
        "kpt_decode": None if loaded.kpt_shape is None else ("pose26" if loaded.kpt_decode == KPT_DECODE_POSE26 else "pose"),
        "nm": loaded.nm,  # mask coefficients (segment), else 0
        "angle_decode": None if loaded.angle_decode == ANGLE_DECODE_NONE else ("obb26" if loaded.angle_decode == ANGLE_DECODE_OBB26 else "obb"),
        "stride": loaded.strides,
        "max_stride": loaded.max_stride,
        "reg_max": loaded.reg_max,
        "end2end": loaded.end2end,
        "head": _head(loaded),
        "head_type": loaded.head_type,
        "imgsz": imgsz,  # [h, w] letterbox target
        # "rect" (minimal padding, as YOLO.predict) or "square"; None for classify, which is resized and
        # center-cropped instead (handler/preprocess.py picks the transform from the task)
        "letterbox": None if loaded.task == "classify" else letterbox,
        "versions": {"ultralytics": ultralytics.__version__, "torch": torch.__version__},
        "weights": {"file": loaded.path.name, "sha256": loaded.weights_sha256},
        "format": backbone_format,
        "backbone": AOTI_BACKBONE_FILE if backbone_format == AOTI_FORMAT else BACKBONE_FILE,
    }


def _head(loaded: LoadedModel) -> str:
    if loaded.task == "classify":
        return "Classify (softmax top-k)"
    return "one2one (NMS-free top-k)" if loaded.end2end else "one2many (NMS)"


def to_json(metadata: dict) -> str:
    return json.dumps(metadata, indent=2)
