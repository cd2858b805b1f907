"""Decoded images -> detections, with the two exported TorchScript files. No TorchServe here.

The TorchServe handler (``handler/yolo_handler.py``) and the export check (``export/verify.py``)
both run images through :class:`YoloPipeline`, so what we verify is what we serve.

Per image: letterbox (``handler/letterbox.py``) -> group images whose letterboxed shapes are equal
-> one backbone forward per group -> the scripted postprocessor, with each image's own geometry and
thresholds. A result therefore never depends on which other images share its batch.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from handler.preprocess import ImageParams, image_transform

CONTRACT_VERSION = 2  # must equal export.postprocess.CONTRACT_VERSION of the files we load
METADATA_FILE = "metadata.json"  # key in the TorchScript _extra_files, and the file export writes
BACKBONE_FILE = "backbone.pt"
POSTPROCESS_FILE = "postprocess.pt"


class ArtifactError(RuntimeError):
    """The exported files are missing, inconsistent, or of another contract version."""


@dataclass(frozen=True)
class Thresholds:
    """Per-request filtering; the defaults are Ultralytics' predict defaults."""

    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    classes: tuple[int, ...] | None = None  # class ids to keep; None keeps all

    def validate(self, nc: int) -> "Thresholds":
        """Raise ``ValueError`` naming the bad value; return self when all are in range."""
        if not 0.0 <= self.conf <= 1.0:
            raise ValueError(f"conf must be between 0 and 1, got {self.conf}")
        if not 0.0 <= self.iou <= 1.0:
            raise ValueError(f"iou must be between 0 and 1, got {self.iou}")
        if not 1 <= self.max_det <= 10000:
            raise ValueError(f"max_det must be between 1 and 10000, got {self.max_det}")
        if self.classes is not None:
            bad = [c for c in self.classes if not 0 <= c < nc]
            if bad:
                raise ValueError(f"class ids {bad} out of range 0..{nc - 1}")
        return self


@dataclass
class Prepared:
    """One letterboxed (classify: resized and cropped) image, ready to batch: ``pixels: uint8[H, W, 3]``
    BGR, its geometry, and its per-request options (``handler.classify.TopK`` for classify models)."""

    pixels: np.ndarray
    params: ImageParams
    thresholds: Thresholds


@dataclass
class StageTimes:
    """Milliseconds spent per stage for one call of :meth:`YoloPipeline.infer`."""

    inference: float = 0.0
    postprocess: float = 0.0
    forwards: list[tuple[int, int, int]] = field(default_factory=list)  # (batch, H, W) of each backbone call


def threshold_tensors(
    thresholds: list[Thresholds], nc: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per-image thresholds -> the postprocessor's ``conf: float32[B]``, ``iou: float32[B]``,
    ``max_det: int64[B]`` and ``class_mask: bool[B, nc]`` (None when no image filters classes)."""
    conf = torch.tensor([t.conf for t in thresholds], dtype=torch.float32)
    iou = torch.tensor([t.iou for t in thresholds], dtype=torch.float32)
    max_det = torch.tensor([t.max_det for t in thresholds], dtype=torch.long)
    class_mask = None
    if any(t.classes is not None for t in thresholds):
        class_mask = torch.ones(len(thresholds), nc, dtype=torch.bool)
        for row, t in enumerate(thresholds):
            if t.classes is not None:
                class_mask[row] = False
                class_mask[row, list(t.classes)] = True
    return conf, iou, max_det, class_mask


def _jit_load(path: Path, device: torch.device) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit.* deprecation notices in torch 2.14
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    if not extra[METADATA_FILE]:
        raise ArtifactError(f"{path} has no embedded {METADATA_FILE}; re-export it with `python -m export`")
    return module.eval(), json.loads(extra[METADATA_FILE])


def load_artifacts(model_dir: str | Path, device: torch.device) -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule, dict]:
    """Load the backbone (``backbone.pt``, or ``backbone.pt2`` when the metadata says ``"format": "aoti"``) and
    ``postprocess.pt`` from ``model_dir`` onto ``device`` and check their metadata."""
    model_dir = Path(model_dir)
    if not (model_dir / POSTPROCESS_FILE).is_file():
        raise ArtifactError(f"{model_dir / POSTPROCESS_FILE} not found; export the model with `python -m export`")
    postprocess, meta_p = _jit_load(model_dir / POSTPROCESS_FILE, device)
    backbone_file = meta_p.get("backbone", BACKBONE_FILE)  # the metadata names the backbone's format and file
    if not (model_dir / backbone_file).is_file():
        raise ArtifactError(f"{model_dir / backbone_file} not found; export the model with `python -m export`")
    if meta_p.get("format") == "aoti":
        from handler.aoti_backbone import load_aoti_backbone  # imports Inductor: only for .pt2 exports

        try:
            backbone, meta_b = load_aoti_backbone(model_dir / backbone_file, device)
        except ValueError as e:
            raise ArtifactError(str(e)) from None
    else:
        backbone, meta_b = _jit_load(model_dir / backbone_file, device)
    if meta_b != meta_p:
        raise ArtifactError(f"{backbone_file} and {POSTPROCESS_FILE} come from different exports; export both again")
    if meta_p.get("contract") != CONTRACT_VERSION:
        raise ArtifactError(
            f"exported files have contract version {meta_p.get('contract')}, this handler reads {CONTRACT_VERSION}; "
            "re-export with the matching `python -m export`"
        )
    return backbone, postprocess, meta_p


class YoloPipeline:
    """Letterbox, batch by shape, run ``backbone.pt`` then ``postprocess.pt``."""

    def __init__(
        self,
        backbone: torch.jit.ScriptModule,
        postprocess: torch.jit.ScriptModule,
        metadata: dict,
        device: torch.device | str = "cpu",
        half: bool = False,
        imgsz: int | list[int] | None = None,
        letterbox_mode: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        if half and self.device.type != "cuda":
            raise ValueError("half=True needs a CUDA device; FP16 is not used on CPU")
        self.half = half
        self.metadata = metadata
        self.names: list[str] = list(metadata["names"])
        self.stride = int(metadata["max_stride"])
        self.imgsz = imgsz if imgsz is not None else metadata["imgsz"]
        self.letterbox_mode = letterbox_mode or metadata["letterbox"]
        self.transform = image_transform(metadata["task"], self.imgsz, self.stride, self.letterbox_mode)
        self.backbone = backbone.half() if half else backbone
        self.postprocess = postprocess

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: torch.device | str = "cpu", **kwargs) -> "YoloPipeline":
        backbone, postprocess, metadata = load_artifacts(model_dir, torch.device(device))
        return cls(backbone, postprocess, metadata, device=device, **kwargs)

    @property
    def nc(self) -> int:
        return len(self.names)

    def prepare(self, image: np.ndarray, thresholds: Thresholds = Thresholds()) -> Prepared:
        """Letterbox (classify: resize and crop) one ``uint8[H, W, 3]`` BGR image."""
        pixels, params = self.transform(image)
        return Prepared(pixels, params, thresholds.validate(self.nc))

    def to_input(self, pixels: list[np.ndarray]) -> Tensor:
        """``n x uint8[H, W, 3]`` BGR -> ``float[n, 3, H, W]`` RGB 0..1 on the device.

        The channel swap is OpenCV's (several times faster than a torch flip on CPU), uint8 crosses to
        the GPU, and the NHWC -> NCHW permute leaves the batch channels-last, which the CPU convolutions
        prefer. Values equal Ultralytics' preprocess exactly.
        """
        rgb = np.stack([cv2.cvtColor(p, cv2.COLOR_BGR2RGB) for p in pixels])  # [n, H, W, 3] uint8
        batch = torch.from_numpy(rgb).to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # [n, 3, H, W]
        return (batch.half() if self.half else batch.float()).div_(255)

    def infer(self, items: list[Prepared]) -> tuple[list[Tensor], StageTimes]:
        """Run prepared images; returns per image ``float32[n_i, ncols]`` on CPU (see the
        postprocessor contract in ``export/postprocess.py``) and the stage times."""
        results, _, times = self.infer_with_masks(items)
        return results, times

    def infer_with_masks(self, items: list[Prepared]) -> tuple[list[Tensor], list[Tensor | None], StageTimes]:
        """As :meth:`infer`, plus per image the instance masks of a segment model,
        ``uint8[n_i, orig_h, orig_w]`` 0/1 on CPU, row ``j`` belonging to detection ``j`` (None for other tasks)."""
        times = StageTimes()
        results: list[Tensor] = [torch.empty(0)] * len(items)
        masks: list[Tensor | None] = [None] * len(items)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.pixels.shape[:2], []).append(i)
        with torch.inference_mode():
            for (h, w), idx in groups.items():
                t0 = time.perf_counter()
                feats = list(self.backbone(self.to_input([items[i].pixels for i in idx])))
                self._sync()
                t1 = time.perf_counter()
                geometry = torch.tensor([items[i].params.as_row() for i in idx], dtype=torch.float32)
                thresholds = threshold_tensors([items[i].thresholds for i in idx], self.nc)
                dets, counts, group_masks = self.postprocess(feats, geometry, *thresholds)
                dets, counts, group_masks = dets.cpu(), counts.cpu(), group_masks.cpu()
                t2 = time.perf_counter()
                for row, i in enumerate(idx):
                    n = int(counts[row])
                    results[i] = dets[row, :n]
                    if self.metadata.get("task") == "segment":
                        p = items[i].params
                        masks[i] = group_masks[row, :n, : p.orig_h, : p.orig_w]
                times.inference += (t1 - t0) * 1000
                times.postprocess += (t2 - t1) * 1000
                times.forwards.append((len(idx), h, w))
        return results, masks, times

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warmup(self, runs: int = 2) -> None:
        """Run gray images through everything ``runs`` times (JIT profiling, oneDNN/cuDNN kernel choice,
        allocator), at the input shapes of common photos: square, 4:3 landscape and portrait, 16:9.

        Each new input shape costs a slow first few calls (measured here: 100-200 ms extra on CPU),
        so the shapes most requests will have are paid for at load time, not by the first users.
        """
        h, w = (self.imgsz, self.imgsz) if isinstance(self.imgsz, int) else self.imgsz
        aspect = [(h, w)]
        if self.letterbox_mode == "rect":
            aspect += [(3 * h // 4, w), (h, 3 * w // 4), (9 * h // 16, w)]
        images = [np.full((ah, aw, 3), 114, np.uint8) for ah, aw in dict.fromkeys(aspect)]
        for _ in range(runs):
            for image in images:
                self.infer([self.prepare(image)])
