"""In-process measurements: L0 (backbone only), L1 (bytes -> JSON pipeline), U (``YOLO.predict``),
the postprocessor alone, the speed levers measured side by side, and the CUDA extras.

Every function times one call and returns milliseconds; the caller interleaves them. Torch's
thread count is set explicitly before each timed call, because Ultralytics resets it to
``min(8, cpu_count - 1)`` whenever a predictor starts.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from bench.stats import median
from handler.image.decode import decode_image
from handler.pipeline import YoloPipeline
from handler.response import encode_response
from handler.service import YoloService
from handler.tasks.detect import threshold_tensors


@dataclass
class BenchImage:
    """One test image: its name, file path and encoded bytes."""

    name: str
    path: Path
    data: bytes


def generated_frame(path: Path, source: Path, size: tuple[int, int] = (3840, 2160), seed: int = 0) -> Path:
    """A 3840x2160 JPEG made from ``source`` (cubic upscale plus seeded noise, quality 90), written to ``path``."""
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    big = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
    noise = np.random.default_rng(seed).integers(-8, 9, big.shape, dtype=np.int16)
    big = np.clip(big.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("cv2.imencode failed for the generated frame")
    path.write_bytes(buf.tobytes())
    return path


class InProcess:
    """The exported pipeline and Ultralytics' ``YOLO`` in this process, on the same images."""

    def __init__(self, pipeline: YoloPipeline, weights: str | None, images: list[BenchImage]) -> None:
        self.pipeline = pipeline
        self.service = YoloService(pipeline)  # L1 is the public service, exactly as the handler calls it
        self.images = {im.name: im for im in images}
        self.yolo = None
        if weights is not None:
            from ultralytics import YOLO
            from ultralytics.utils import NUM_THREADS

            self.yolo = YOLO(weights)
            self.u_threads = NUM_THREADS  # what Ultralytics' predictor sets for itself on CPU
        # L0's input: each image already letterboxed and converted, as the pipeline would feed it
        self.l0_inputs = {
            name: pipeline.to_input([pipeline.prepare(decode_image(im.data)).pixels]) for name, im in self.images.items()
        }

    @staticmethod
    def _threads(n: int | None) -> None:
        if n and torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def l0(self, name: str, threads: int | None = None) -> float:
        """Backbone forward only, on the letterboxed tensor."""
        self._threads(threads)
        x = self.l0_inputs[name]
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.pipeline.backbone(x)
            self.pipeline._sync()
            return (time.perf_counter() - t0) * 1000

    def l1(self, name: str, threads: int | None = None) -> tuple[float, dict[str, float]]:
        """Encoded bytes -> :meth:`YoloService.predict` (parse, decode, transform, backbone, postprocessor,
        response body) -> JSON text; the total and the stages the service measured itself (ms).

        The stages are timed separately from the total, so their sum is at most the total; the gap is
        the service's own bookkeeping."""
        self._threads(threads)
        data = self.images[name].data
        t0 = time.perf_counter()
        answer = self.service.predict(data)
        t1 = time.perf_counter()
        encode_response(answer.body)
        t2 = time.perf_counter()
        if answer.status != 200:
            raise RuntimeError(f"L1 on {name}: {answer.status} {answer.body}")
        speed = answer.body["speed_ms"]  # rounded to 0.01 ms
        stages = {
            "preprocess": speed["preprocess"],  # parse + decode + letterbox
            "backbone": speed["inference"],  # includes the uint8 -> float input conversion (to_input)
            "postprocess": speed["postprocess"],  # the postprocessor call
            "json": (t2 - t1) * 1000,
        }
        return (t2 - t0) * 1000, stages

    def u(self, name: str) -> float:
        """``YOLO(weights).predict(path)`` with default settings, as a user runs it."""
        if self.yolo is None:
            raise RuntimeError("InProcess was built without weights; U needs the Ultralytics checkpoint")
        self._threads(self.u_threads)
        path = str(self.images[name].path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            self.yolo.predict(path, verbose=False)
            return (time.perf_counter() - t0) * 1000

    # --- the postprocessor alone ------------------------------------------------------------

    def postprocess_inputs(self, name: str, hw: tuple[int, int] = (640, 640)):
        """Backbone outputs for ``name`` letterboxed square to ``hw`` (640x640: 8400 anchors), and its arguments."""
        from handler.image.letterbox import letterbox

        pixels, params = letterbox(decode_image(self.images[name].data), list(hw), self.pipeline.stride, "square")
        with torch.inference_mode():
            feats = list(self.pipeline.backbone(self.pipeline.to_input([pixels])))
        anchors = sum(f.shape[2] * f.shape[3] for f in feats)
        geometry = torch.tensor([params.as_row()], dtype=torch.float32)
        return feats, geometry, threshold_tensors([self.pipeline.task.default_options()], self.pipeline.nc), anchors

    def postprocess_once(self, feats, geometry, thresholds, threads: int | None = None) -> float:
        self._threads(threads)
        with torch.inference_mode():
            t0 = time.perf_counter()
            dets, counts, _masks = self.pipeline.postprocess(feats, geometry, *thresholds)
            dets.cpu()
            return (time.perf_counter() - t0) * 1000


def levers(proc: InProcess, name: str, rounds: int, thread_counts: list[int]) -> dict[str, dict[str, dict[str, float]]]:
    """Each speed lever's alternatives on ``name`` at each torch thread count, interleaved round by
    round; ``{lever: {alternative: {threads: median ms}}}``. Comparing the thread columns of the
    backbone rows is the torch-threads lever."""
    from handler.image.letterbox import letterbox

    pipe = proc.pipeline
    data = proc.images[name].data
    image = decode_image(data)
    x = proc.l0_inputs[name]
    rect_pixels, _ = letterbox(image, pipe.imgsz, pipe.stride, "rect")
    square_pixels, _ = letterbox(image, pipe.imgsz, pipe.stride, "square")
    body = proc.service.predict(data).body

    def forward(t: torch.Tensor) -> None:
        with torch.inference_mode():
            pipe.backbone(t)

    def to_input_torch_flip() -> None:  # the alternative to OpenCV's channel swap: flip in torch, then float
        t = torch.from_numpy(rect_pixels).flip(-1).permute(2, 0, 1).unsqueeze(0)
        t.float().div_(255)

    cases: dict[str, dict[str, Callable[[], object]]] = {
        "decode (JPEG)": {"cv2.imdecode": lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)},
        "JSON encoding": {
            "handler returns the dict: TorchServe's json.dumps(indent=2)": lambda: json.dumps(body, indent=2),
            "handler returns compact JSON text (encode_response)": lambda: encode_response(body),
        },
        "input conversion": {
            "cv2 BGR->RGB + permute (channels_last)": lambda: pipe.to_input([rect_pixels]),
            "torch flip + permute": to_input_torch_flip,
        },
        "memory format (backbone)": {
            "channels_last input": lambda: forward(x),
            "contiguous NCHW input": lambda: forward(x.contiguous()),
        },
        "letterbox (backbone)": {
            f"rect {tuple(rect_pixels.shape[:2])}": lambda: forward(pipe.to_input([rect_pixels])),
            f"square {tuple(square_pixels.shape[:2])}": lambda: forward(pipe.to_input([square_pixels])),
        },
    }
    try:
        import torchvision.io as tvio

        tv_data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        cases["decode (JPEG)"]["torchvision.io.decode_jpeg"] = lambda: tvio.decode_jpeg(tv_data)
    except ImportError:
        pass
    times: dict[tuple[str, str, int], list[float]] = {}
    with warnings.catch_warnings():  # torchvision 0.29 warns on every decode_jpeg (deprecated); we only compare it
        warnings.simplefilter("ignore", DeprecationWarning)
        for r in range(rounds + 1):  # the first round warms up and is dropped
            for n in thread_counts:
                proc._threads(n)
                for lever, alts in cases.items():
                    for alt, fn in alts.items():
                        t0 = time.perf_counter()
                        fn()
                        if r:
                            times.setdefault((lever, alt, n), []).append((time.perf_counter() - t0) * 1000)
    return {
        lever: {alt: {str(n): _median(times[(lever, alt, n)]) for n in thread_counts} for alt in alts}
        for lever, alts in cases.items()
    }


def _median(values: list[float]) -> float:
    return round(median(values), 3)


def gpu_extras(export_dir: Path, proc: InProcess, rounds: int, batches: list[int]) -> dict:
    """On CUDA: FP32 against FP16 (L0 and L1 per image) and a backbone batch sweep at 640x640 with
    peak GPU memory. Returns ``{"skipped": reason}`` without CUDA."""
    if not torch.cuda.is_available():
        return {"skipped": "CUDA is not available"}
    out: dict = {"device": torch.cuda.get_device_name(0), "precision": {}, "batch_sweep": []}
    images = list(proc.images.values())
    pipes = {label: YoloPipeline.from_dir(export_dir, "cuda", half=half) for label, half in (("fp32", False), ("fp16", True))}
    for label, pipe in pipes.items():
        pipe.warmup(2)
        gp = InProcess(pipe, None, images)
        l0: dict[str, list[float]] = {im.name: [] for im in images}
        l1: dict[str, list[float]] = {im.name: [] for im in images}
        for r in range(rounds + 2):  # the first two rounds warm up
            for im in images:
                a, b = gp.l0(im.name), gp.l1(im.name)[0]
                if r >= 2:
                    l0[im.name].append(a)
                    l1[im.name].append(b)
        out["precision"][label] = {
            "L0_p50_ms": {k: _median(v) for k, v in l0.items()},
            "L1_p50_ms": {k: _median(v) for k, v in l1.items()},
        }
    for b in batches:
        for label, pipe in pipes.items():
            x = torch.rand(b, 3, 640, 640, device="cuda", dtype=torch.float16 if pipe.half else torch.float32)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ms = []
            with torch.inference_mode():
                for i in range(rounds + 2):
                    t0 = time.perf_counter()
                    pipe.backbone(x)
                    torch.cuda.synchronize()
                    if i >= 2:
                        ms.append((time.perf_counter() - t0) * 1000)
            p50 = _median(ms)
            out["batch_sweep"].append({
                "precision": label, "batch": b, "p50_ms": p50, "images_per_s": round(1000 * b / p50, 1),
                "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            })
            del x
        torch.cuda.empty_cache()
    return out
