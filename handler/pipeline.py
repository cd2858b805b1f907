"""Decoded images -> task outputs, with the two exported files. No TorchServe here.

The service (``handler/service.py``, which the TorchServe handler adapts) and the export check
(``export/verify.py``) both run images through :class:`YoloPipeline`, so what we verify is what we serve.

Per image: the task's transform (the letterbox, or classify's resize + crop) -> group images whose
transformed shapes are equal -> one backbone forward per group -> the task's postprocessor call, with
each image's own geometry and options. A result therefore never depends on which other images share
its batch. What the outputs are is the task's (``handler/tasks/``).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from handler.contract import (
    AOTI_FORMAT,
    BACKBONE_FILE,
    METADATA_FILE,
    POSTPROCESS_FILE,
    ArtifactError,
    check_metadata,
)
from handler.tasks import Prepared, Task, task_for


@dataclass
class StageTimes:
    """Milliseconds spent per stage for one call of :meth:`YoloPipeline.infer`."""

    inference: float = 0.0
    postprocess: float = 0.0
    forwards: list[tuple[int, int, int]] = field(default_factory=list)  # (batch, H, W) of each backbone call


def _jit_load(path: Path, device: torch.device) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit.* deprecation notices in torch 2.14
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    if not extra[METADATA_FILE]:
        raise ArtifactError(f"{path} has no embedded {METADATA_FILE}; re-export it with `python -m export`")
    return module.eval(), json.loads(extra[METADATA_FILE])


def load_artifacts(model_dir: str | Path, device: torch.device) -> tuple[Any, torch.jit.ScriptModule, dict]:
    """Load the backbone (``backbone.pt``, or ``backbone.pt2`` when the metadata says ``"format": "aoti"``) and
    ``postprocess.pt`` from ``model_dir`` onto ``device`` and check their metadata."""
    model_dir = Path(model_dir)
    if not (model_dir / POSTPROCESS_FILE).is_file():
        raise ArtifactError(f"{model_dir / POSTPROCESS_FILE} not found; export the model with `python -m export`")
    postprocess, meta_p = _jit_load(model_dir / POSTPROCESS_FILE, device)
    backbone_file = meta_p.get("backbone", BACKBONE_FILE)  # the metadata names the backbone's format and file
    if not (model_dir / backbone_file).is_file():
        raise ArtifactError(f"{model_dir / backbone_file} not found; export the model with `python -m export`")
    if meta_p.get("format") == AOTI_FORMAT:
        from handler.aoti_backbone import load_aoti_backbone  # imports Inductor: only for .pt2 exports

        try:
            backbone, meta_b = load_aoti_backbone(model_dir / backbone_file, device)
        except ValueError as e:
            raise ArtifactError(str(e)) from None
    else:
        backbone, meta_b = _jit_load(model_dir / backbone_file, device)
    if meta_b != meta_p:
        raise ArtifactError(f"{backbone_file} and {POSTPROCESS_FILE} come from different exports; export both again")
    return backbone, postprocess, check_metadata(meta_p, str(model_dir / POSTPROCESS_FILE))


class YoloPipeline:
    """The task's transform, batch by shape, ``backbone.pt`` then ``postprocess.pt``."""

    def __init__(
        self,
        backbone: Any,
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
        self.task: Task = task_for(metadata["task"])
        self.names: list[str] = list(metadata["names"])
        self.stride = int(metadata["max_stride"])
        self.imgsz = imgsz if imgsz is not None else metadata["imgsz"]
        self.letterbox_mode = letterbox_mode or metadata["letterbox"]
        self.transform = self.task.transform(self.imgsz, self.stride, self.letterbox_mode)
        self.backbone = backbone.half() if half else backbone
        self.postprocess = postprocess

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: torch.device | str = "cpu", **kwargs) -> "YoloPipeline":
        backbone, postprocess, metadata = load_artifacts(model_dir, torch.device(device))
        return cls(backbone, postprocess, metadata, device=device, **kwargs)

    @property
    def nc(self) -> int:
        return len(self.names)

    def prepare(self, image: np.ndarray, options: Any = None) -> Prepared:
        """Transform one ``uint8[H, W, 3]`` BGR image. ``options``: the task's postprocessor options,
        already validated (the request parser validates them); None: the task's defaults."""
        pixels, params = self.transform(image)
        return Prepared(pixels, params, self.task.default_options() if options is None else options)

    def to_input(self, pixels: list[np.ndarray]) -> Tensor:
        """``n x uint8[H, W, 3]`` BGR -> ``float[n, 3, H, W]`` RGB 0..1 on the device.

        The channel swap is OpenCV's (several times faster than a torch flip on CPU), uint8 crosses to
        the GPU, and the NHWC -> NCHW permute leaves the batch channels-last, which the CPU convolutions
        prefer. Values equal Ultralytics' preprocess exactly.
        """
        rgb = np.stack([cv2.cvtColor(p, cv2.COLOR_BGR2RGB) for p in pixels])  # [n, H, W, 3] uint8
        batch = torch.from_numpy(rgb).to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # [n, 3, H, W]
        return (batch.half() if self.half else batch.float()).div_(255)

    def infer(self, items: list[Prepared]) -> tuple[list[Any], StageTimes]:
        """Run prepared images; returns one task output per image, on CPU (``Detections`` for the
        detection family, ``TopClasses`` for classify), and the stage times."""
        times = StageTimes()
        results: list[Any] = [None] * len(items)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.pixels.shape[:2], []).append(i)
        with torch.inference_mode():
            for (h, w), idx in groups.items():
                t0 = time.perf_counter()
                feats = list(self.backbone(self.to_input([items[i].pixels for i in idx])))
                self._sync()
                t1 = time.perf_counter()
                outputs = self.task.postprocess(self.postprocess, feats, [items[i] for i in idx], self.nc)
                t2 = time.perf_counter()
                for i, out in zip(idx, outputs):
                    results[i] = out
                times.inference += (t1 - t0) * 1000
                times.postprocess += (t2 - t1) * 1000
                times.forwards.append((len(idx), h, w))
        return results, times

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
