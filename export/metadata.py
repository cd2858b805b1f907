"""The self-description embedded in both TorchScript files (``_extra_files["metadata.json"]``) and
written beside them as ``metadata.json``. The handler reads and checks it at load time."""

from __future__ import annotations

import json

import torch

from export.checkpoint import LoadedModel
from export.postprocess import ANGLE_DECODE_NONE, ANGLE_DECODE_OBB26, KPT_DECODE_POSE26
from export.tasks import export_task
from handler.contract import BACKBONE_FILES, CONTRACT_VERSION, DEFAULT_MODEL_VERSION, METADATA_KEYS, TORCHSCRIPT_FORMAT


def build_metadata(
    loaded: LoadedModel, name: str, imgsz: list[int], letterbox: str, backbone_format: str = TORCHSCRIPT_FORMAT,
    version: str = DEFAULT_MODEL_VERSION,
) -> dict:
    """Everything a server needs to know about the exported pair, JSON-serialisable.

    ``format`` names how the backbone is stored (``torchscript``: ``backbone.pt``; ``aoti``:
    ``backbone.pt2``) and ``backbone`` its file; the handler loads whichever they name."""
    import ultralytics

    task = export_task(loaded)
    meta = {
        "contract": CONTRACT_VERSION,
        "name": name,
        "model_version": version,
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
        "head": task.describe_head(loaded),
        "head_type": loaded.head_type,
        "imgsz": imgsz,  # [h, w] letterbox target
        # "rect" (minimal padding, as YOLO.predict) or "square"; None for a task whose transform is not the
        # letterbox (classify's resize + crop, the stretch of depth and RT-DETR: handler/tasks/)
        "letterbox": letterbox if task.served.letterbox else None,
        "versions": {"ultralytics": ultralytics.__version__, "torch": torch.__version__},
        "weights": {"file": loaded.path.name, "sha256": loaded.weights_sha256},
        "format": backbone_format,
        "backbone": BACKBONE_FILES[backbone_format],
    }
    if list(meta) != list(METADATA_KEYS):  # handler/contract.py is the one list of keys, in this order
        raise AssertionError(f"metadata keys {list(meta)} differ from handler.contract.METADATA_KEYS")
    return meta


def to_json(metadata: dict) -> str:
    return json.dumps(metadata, indent=2)
