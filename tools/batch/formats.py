"""The output formats of a batch, as functions of one image's name and the server's answer for it.

* **JSON lines**: the answer as the server sent it, with ``"path"`` (the image's name) first.
* **COCO results** (what ``pycocotools.COCO.loadRes`` reads): one object per detection, ``image_id``,
  ``category_id``, ``bbox`` ``[x, y, w, h]`` in pixels, ``score``; pose models add ``keypoints``
  ``[x1, y1, v1, ...]``, segment models ``segmentation`` (the answer's COCO RLE as it is), OBB models
  ``rbox`` ``[cx, cy, w, h, angle]`` and ``poly`` (the 4 corners), as Ultralytics' OBB validator writes
  them, with ``bbox`` the corners' hull.
* **YOLO label files**: what ``YOLO.predict(save_txt=True, save_conf=True)`` writes, written by
  Ultralytics' own ``Results.save_txt`` from a ``Results`` built from the answer (:func:`ultralytics_results`),
  so that the layout and the number formatting are the installed Ultralytics' by construction. For the
  values to be Ultralytics' too, the answer must carry unrounded numbers (request ``full_precision=true``,
  which the batch client sends for this format): ``save_txt`` prints 6 significant digits of normalised
  coordinates, finer than the 2 decimals of a pixel the server sends by default. docs/batch.md says how
  close the files come to Ultralytics' and why they are not always byte-equal.

Which kind of answer it is comes from its content (``"top"``: classify; ``"detections"`` with
``"obb"``, ``"keypoints"`` or ``"mask"``), as ``tools/client.py``'s ``draw`` reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tools.client import decode_rle


class FormatError(ValueError):
    """The answer cannot be written in the chosen format (e.g. a classify answer as COCO results)."""


def jsonl_line(name: str, answer: dict) -> str:
    """One line of the JSON lines output (no newline): ``{"path": name, ...the answer...}``."""
    return json.dumps({"path": name, **answer}, separators=(",", ":"))


def _detections(answer: dict, fmt: str) -> list[dict]:
    if "detections" not in answer:
        raise FormatError(
            f"--format {fmt}: the model is a {answer.get('task', 'non-detection')} model, whose answers hold no detections; "
            "use --format jsonl" + (" or yolo" if "top" in answer and fmt != "yolo" else "")
        )
    return answer["detections"]


def coco_annotations(answer: dict, image_id: int, category_id: Callable[[int, str], int]) -> list[dict]:
    """The COCO result objects of one answer. ``category_id(class_id, class_name)``: the COCO category of a
    class (the class id itself, or the id of the category of that name in a ground-truth file)."""
    out = []
    for d in _detections(answer, "coco"):
        x1, y1, x2, y2 = d["box"]
        ann: dict[str, Any] = {
            "image_id": image_id,
            "category_id": category_id(d["class_id"], d["class_name"]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": d["score"],
        }
        if "keypoints" in d:
            ann["keypoints"] = [v for kpt in d["keypoints"] for v in kpt]
        if "mask" in d:
            ann["segmentation"] = d["mask"]
        if "obb" in d:
            o = d["obb"]
            ann["rbox"] = [o["cx"], o["cy"], o["w"], o["h"], o["angle"]]
            ann["poly"] = [v for corner in d["corners"] for v in corner]
        out.append(ann)
    return out


def ultralytics_results(answer: dict, path: str = ""):
    """The answer as an Ultralytics ``Results`` (tensors in float32, as Ultralytics holds them): boxes (or
    rotated boxes), keypoints, masks decoded at the image's size, or classify probabilities (the answer's
    top classes at their class ids, 0 elsewhere)."""
    import torch
    from ultralytics.engine.results import Results  # imported here: about 1 s, and only this format needs it

    h, w = answer["image"]["height"], answer["image"]["width"]
    canvas = np.empty((h, w, 0), np.uint8)  # Results takes the image's shape from it; save_txt reads no pixel
    if "top" in answer:
        top = answer["top"]
        probs = torch.zeros(max((c["class_id"] for c in top), default=-1) + 1, dtype=torch.float32)
        for c in top:
            probs[c["class_id"]] = c["score"]
        return Results(canvas, path, {c["class_id"]: c["class_name"] for c in top}, probs=probs)
    dets = _detections(answer, "yolo")
    names = {d["class_id"]: d["class_name"] for d in dets}
    score_class = torch.tensor([[d["score"], d["class_id"]] for d in dets], dtype=torch.float32).reshape(-1, 2)  # [N, 2]
    if dets and "obb" in dets[0]:
        xywhr = torch.tensor([[d["obb"][k] for k in ("cx", "cy", "w", "h", "angle")] for d in dets], dtype=torch.float32)  # [N, 5]
        return Results(canvas, path, names, obb=torch.cat((xywhr, score_class), 1))  # [N, 7]
    boxes = torch.cat((torch.tensor([d["box"] for d in dets], dtype=torch.float32).reshape(-1, 4), score_class), 1)  # [N, 6]
    keypoints = masks = None
    if dets and "keypoints" in dets[0]:
        keypoints = torch.tensor([d["keypoints"] for d in dets], dtype=torch.float32)  # [N, K, 3]
    if dets and "mask" in dets[0]:
        masks = torch.from_numpy(np.stack([decode_rle(d["mask"]) for d in dets]))  # uint8 [N, H, W] 0/1
    return Results(canvas, path, names, boxes=boxes, masks=masks, keypoints=keypoints)


def write_yolo_label(answer: dict, label: Path) -> bool:
    """Write ``label`` as ``YOLO.predict(save_txt=True, save_conf=True)`` would for this answer (replacing an
    older one); as there, no file when there is nothing to write (no detection). True when written."""
    label.parent.mkdir(parents=True, exist_ok=True)
    partial = label.with_name(label.name + ".partial")
    partial.unlink(missing_ok=True)
    ultralytics_results(answer).save_txt(partial, save_conf=True)  # save_txt appends: start from no file
    if partial.exists():
        os.replace(partial, label)
        return True
    label.unlink(missing_ok=True)
    return False


def yolo_label_path(out_dir: Path, name: str) -> Path:
    """Where the label file of the image named ``name`` goes: the same relative folder, the suffix ``.txt``
    (Ultralytics names it after the image's stem in one folder; keeping the folders keeps two images of the
    same stem in different folders apart)."""
    return out_dir / Path(name).with_suffix(".txt")
