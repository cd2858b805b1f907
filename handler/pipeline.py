"""Decoded images -> task outputs, with the two exported files. No TorchServe here.

The service (``handler/service.py``, which the TorchServe handler adapts) and the export check
(``export/verify.py``) both run images through :class:`YoloPipeline`, so what we verify is what we serve.

Per image: the task's transform (the letterbox, or classify's resize + crop) -> group images whose
transformed shapes are equal -> one backbone forward per group -> the task's postprocessor call, with
each image's own geometry and options. A result therefore never depends on which other images share
its batch. What the outputs are is the task's (``handler/tasks/``).

``preprocess="device"`` moves the transform to the model's device: :meth:`YoloPipeline.prepare` only computes
the geometry the task declares (:meth:`handler.tasks.base.Task.placement`: the letterbox's or the stretch's),
and the decoded uint8 image is uploaded (pinned memory,
``non_blocking``) and letterboxed, converted and normalised there (``handler/image/letterbox_torch.py``), with the
same pixels and the same network input as on the CPU. On CUDA, each group's input is made on a side stream
while the previous group's forward runs (``handler/runtime/overlap.py``), in either mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from handler.config import PREPROCESS_MODES
from handler.image import letterbox_torch
from handler.runtime.artifacts import load_artifacts
from handler.runtime.overlap import SideStream, Staged, run_groups
from handler.runtime.runtimes import AUTO, runtime_of
from handler.tasks import PreparedImage, Task, task_for
from handler.tasks.base import Placement


@dataclass
class StageTimes:
    """Milliseconds spent per stage for one call of :meth:`YoloPipeline.infer`.

    ``inference`` is everything but the postprocessor: making each group's network input (the BGR -> RGB swap
    and / 255; with ``preprocess: device`` also the upload and the letterbox on the device), the backbone
    forwards, and waiting for them. On CUDA the next group's input is made on a side stream while a forward
    runs, so the two overlap and cannot be timed apart; the response's ``speed_ms.inference`` and the
    ``YoloInferenceTime`` metric are this figure. The request's own decode and transform (``preprocess: cpu``)
    are ``speed_ms.preprocess``, timed by the service."""

    inference: float = 0.0  # network inputs + backbone forwards (see above)
    postprocess: float = 0.0  # the scripted postprocessor and the task's unpacking of its outputs
    forwards: list[tuple[int, int, int]] = field(default_factory=list)  # (batch, H, W) of each backbone call


def planar_input(pixels: list[np.ndarray]) -> Tensor:
    """``n x uint8[H, W, 3]`` BGR -> ``float32[n, 3, H, W]`` RGB 0..1, dense NCHW (CPU), the values of
    :meth:`YoloPipeline.to_input`: OpenCV splits the planes into place in RGB order, and the one float division
    follows. For a runtime that reads NCHW, this saves the copy out of channels-last (0.2-0.7 ms at 640x480)."""
    planes = np.empty((len(pixels), 3, *pixels[0].shape[:2]), np.uint8)  # [n, 3, H, W]
    for j, p in enumerate(pixels):
        for c, plane in zip((2, 1, 0), cv2.split(p)):  # B, G, R -> channels 2, 1, 0
            planes[j, c] = plane
    return torch.from_numpy(planes).float().div_(255)


def bgr_to_rgb_into(pixels: list[np.ndarray], out: np.ndarray) -> None:
    """``n x uint8[H, W, 3]`` BGR -> ``out: uint8[n, H, W, 3]`` RGB (C-contiguous), written in place by OpenCV."""
    for j, p in enumerate(pixels):
        cv2.cvtColor(p, cv2.COLOR_BGR2RGB, dst=out[j])


class YoloPipeline:
    """The task's transform, batch by shape, ``backbone.pt`` then ``postprocess.pt``.

    ``preprocess``: ``cpu`` (the transform in :meth:`prepare`, OpenCV) or ``device`` (the geometry in
    :meth:`prepare`, the pixels on the model's device in :meth:`infer`); both give the same results."""

    def __init__(
        self,
        backbone: Any,
        postprocess: torch.jit.ScriptModule,
        metadata: dict,
        device: torch.device | str = "cpu",
        half: bool = False,
        imgsz: int | list[int] | None = None,
        letterbox_mode: str | None = None,
        preprocess: str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
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
        self.preprocess = preprocess
        self.placement: Placement | None = None
        if preprocess == "device":
            self.placement = self.task.placement(self.imgsz, self.stride, self.letterbox_mode)
            if self.placement is None:
                raise ValueError(f"preprocess: device makes the letterbox or the stretch on the device; a {self.task.name} "
                                 "model's transform runs on the CPU only; write `preprocess: cpu`")
        self.side = SideStream(self.device)  # CUDA: inputs are made beside the forward
        self.backbone = backbone.half() if half else backbone
        self.postprocess = postprocess

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: torch.device | str = "cpu", runtime: str = AUTO, **kwargs) -> "YoloPipeline":
        """The exported files of ``model_dir``, the backbone run by ``runtime`` (``handler.runtime``)."""
        backbone, postprocess, metadata = load_artifacts(model_dir, torch.device(device), runtime)
        return cls(backbone, postprocess, metadata, device=device, **kwargs)

    @property
    def runtime(self) -> str:
        """What runs the backbone: torchscript | aoti | openvino (``handler/runtime/runtimes.py``)."""
        return runtime_of(self.backbone)[0]

    @property
    def precision(self) -> str:
        """The backbone's precision: fp32 (equal to Ultralytics), or the bf16 / int8 the export was asked for."""
        return runtime_of(self.backbone)[1]

    @property
    def nc(self) -> int:
        return len(self.names)

    def prepare(self, image: np.ndarray, options: Any = None) -> PreparedImage:
        """Transform one ``uint8[H, W, 3]`` BGR image. ``options``: the task's postprocessor options,
        already validated (the request parser validates them); None: the task's defaults.

        With ``preprocess="device"`` only the geometry is computed: the returned ``pixels`` are ``image``
        itself, transformed on the device by :meth:`infer` (use :meth:`network_input`, not :meth:`to_input`)."""
        options = self.task.default_options() if options is None else options
        if self.placement is not None:
            return PreparedImage(image, self.placement((int(image.shape[0]), int(image.shape[1]))), options)
        pixels, params = self.transform(image)
        return PreparedImage(pixels, params, options)

    def to_input(self, pixels: list[np.ndarray]) -> Tensor:
        """``n x uint8[H, W, 3]`` BGR -> ``float[n, 3, H, W]`` RGB 0..1 on the device.

        The channel swap is OpenCV's (several times faster than a torch flip on CPU), uint8 crosses to
        the GPU, and the NHWC -> NCHW permute leaves the batch channels-last, which the CPU convolutions
        prefer. Values equal Ultralytics' preprocess exactly.
        """
        if self.device.type == "cuda":  # swap into pinned memory, so the upload is asynchronous
            host = torch.empty((len(pixels), *pixels[0].shape), dtype=torch.uint8, pin_memory=True)  # [n, H, W, 3]
            bgr_to_rgb_into(pixels, host.numpy())
            batch = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # [n, 3, H, W]
            return (batch.half() if self.half else batch.float()).div_(255)
        if not getattr(self.backbone, "channels_last", True):  # a runtime that reads dense NCHW (OpenVINO)
            return planar_input(pixels)
        rgb = np.stack([cv2.cvtColor(p, cv2.COLOR_BGR2RGB) for p in pixels])  # [n, H, W, 3] uint8
        batch = torch.from_numpy(rgb).to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # [n, 3, H, W]
        return (batch.half() if self.half else batch.float()).div_(255)

    def upload(self, image: np.ndarray | Tensor) -> Tensor:
        """``uint8[H, W, 3]`` -> the same tensor on the device: through pinned memory and ``non_blocking`` on
        CUDA (the copy is ordered on the current stream), shared with the array on CPU. A tensor already on
        the device (an image decoded there) is used as it is."""
        if isinstance(image, Tensor):
            image = image.to(self.device)
            if image.is_cuda:  # made on another stream, maybe: keep its memory until this stream has read it
                image.record_stream(torch.cuda.current_stream(self.device))
            return image
        if self.device.type != "cuda":
            return torch.from_numpy(image)
        host = torch.empty(image.shape, dtype=torch.uint8, pin_memory=True)
        np.copyto(host.numpy(), image)
        return host.to(self.device, non_blocking=True)

    def _input_hw(self, item: PreparedImage) -> tuple[int, int]:
        """The network input shape of a prepared item (its batch group): its pixels' shape, or with
        ``preprocess="device"`` the shape its geometry says the device letterbox makes."""
        if self.placement is not None:
            return item.params.input_h, item.params.input_w
        return item.pixels.shape[:2]

    def network_input(self, items: list[PreparedImage]) -> Tensor:
        """PreparedImage items of one input shape -> ``float[n, 3, H, W]`` RGB 0..1 on the device, in either
        preprocess mode (:meth:`to_input` of their pixels, or the device letterbox of their images)."""
        if self.placement is None:
            return self.to_input([it.pixels for it in items])
        h, w = self._input_hw(items[0])
        batch = torch.empty((len(items), h, w, 3), dtype=torch.uint8, device=self.device)  # [n, H, W, 3] BGR
        for j, it in enumerate(items):
            letterbox_torch.place(self.upload(it.pixels), it.params, out=batch[j])
        return letterbox_torch.to_network_input(batch, self.half)

    def infer(self, items: list[PreparedImage]) -> tuple[list[Any], StageTimes]:
        """Run prepared images; returns one task output per image, on CPU (``Detections`` for the
        detection family, ``TopClasses`` for classify), and the stage times."""
        times = StageTimes()
        results: list[Any] = [None] * len(items)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(items):
            by_shape.setdefault(self._input_hw(item), []).append(i)
        groups = list(by_shape.items())

        def stage(k: int) -> Staged:
            return self.side.stage(lambda: self.network_input([items[i] for i in groups[k][1]]))

        def forward(k: int, staged: Staged) -> list[Tensor]:
            return list(self.backbone(self.side.take(staged)))

        def finish(k: int, feats: list[Tensor]) -> None:
            (h, w), idx = groups[k]
            self._sync()
            t1 = time.perf_counter()
            outputs = self.task.postprocess(self.postprocess, feats, [items[i] for i in idx], self.nc)
            times.postprocess += (time.perf_counter() - t1) * 1000
            for i, out in zip(idx, outputs):
                results[i] = out
            times.forwards.append((len(idx), h, w))

        t0 = time.perf_counter()
        self.side.begin()
        with torch.inference_mode():
            run_groups(len(groups), stage, forward, finish, ahead=self.side.active)
        times.inference = (time.perf_counter() - t0) * 1000 - times.postprocess  # inputs, forwards and their waits
        return results, times

    def _sync(self) -> None:
        """Wait for the forward on the current stream (CUDA), not for the next input on the side stream."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

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
