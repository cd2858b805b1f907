"""The speed sections: images/s and peak memory per batch, precision and input path (L0: the backbone alone; L1:
bytes -> JSON through ``YoloService``), and what the per-batch times say about ``maxBatchDelay``."""

from __future__ import annotations

from typing import Callable

import cv2
import torch

from bench.gpu_check import BENCH_IMAGE, L1_L0_TARGET, LARGE_IMAGE
from bench.gpu_check.checks import gpu_decode, pipeline
from bench.gpu_check.run import Run, median_ms, peak_mib, reset_peak, timed
from handler.config import HandlerConfig
from handler.image.decode import decode_image
from handler.pipeline import YoloPipeline
from handler.response import encode_response
from handler.service import PreparedRequest, YoloService


def _l1_rows(service: YoloService, data: bytes, batch: int) -> Callable[[], None]:
    rows = [{"body": data} for _ in range(batch)]

    def call() -> None:
        result = service.handle(rows)
        for answer in result.answers:
            if answer.status != 200:
                raise RuntimeError(f"L1: {answer.status} {answer.body}")
            encode_response(answer.body)

    return call


def _l1_gpu_decode(service: YoloService, data: bytes, batch: int) -> Callable[[], None]:
    """L1 with the decode on the device: bytes -> nvJPEG (one batched call) -> ``preprocess: device`` -> JSON.
    The same service calls as ``handle`` after its decode (parse is skipped: a raw body has no parameters)."""
    datas = [data] * batch
    device = service.pipeline.device

    def call() -> None:
        items = []
        for idx, image in enumerate(gpu_decode(datas, device)):
            h, w = int(image.shape[0]), int(image.shape[1])
            items.append(PreparedRequest(idx=idx, prepared=service.pipeline.prepare(image, service.defaults), width=w, height=h,
                                         preprocess_ms=0.0))
        for body in service.infer(items)[0]:
            encode_response(body)

    return call


def _l0(pipe: YoloPipeline, data: bytes, batch: int, warm: int, iters: int, min_s: float) -> list[float]:
    """Backbone forwards alone on ``batch`` copies of the image's network input, in the served layout
    (channels-last, as ``network_input`` makes it)."""
    x = pipe.network_input([pipe.prepare(decode_image(data))] * batch)
    with torch.inference_mode():
        return timed(lambda: pipe.backbone(x), pipe.device, warm, iters, min_s)


def section_throughput(run: Run) -> dict:
    pose = run.model_dirs()["pose"]
    images = run.images()
    bus = images[BENCH_IMAGE]
    warm, iters, min_s = (1, 1, 0.0) if run.quick else (2, 3, 1.0)
    precisions = [("fp32", False), ("fp16", True)] if run.cuda else [("fp32", False)]
    try:
        import torchvision.io  # noqa: F401

        modes = ["cpu", "device", "gpu_decode"]
    except ImportError:
        modes = ["cpu", "device"]
    out: dict = {"image": BENCH_IMAGE, "rows": [], "large": [], "timing": {"warm": warm, "min_iters": iters, "min_s": min_s}}
    for label, half in precisions:
        pipes = {mode: pipeline(pose, run.device, half=half, preprocess="cpu" if mode == "cpu" else "device") for mode in modes}
        services = {mode: YoloService(p, HandlerConfig(preprocess=p.preprocess)) for mode, p in pipes.items()}
        for p in pipes.values():
            p.warmup(1)
        for batch in run.batches:
            if run.left() < 30:
                out.setdefault("cut_short", []).append(f"{label} batch {batch}: budget")
                continue
            row: dict = {"precision": label, "batch": batch}
            reset_peak(run.device)
            row["L0_ms"] = median_ms(_l0(pipes["cpu"], bus, batch, warm, iters, min_s))
            row["L0_images_per_s"] = round(1000 * batch / row["L0_ms"], 1)
            row["L0_peak_mib"] = peak_mib(run.device)
            for mode in modes:
                call = _l1_gpu_decode(services[mode], bus, batch) if mode == "gpu_decode" else _l1_rows(services[mode], bus, batch)
                reset_peak(run.device)
                ms = timed(call, run.device, warm, iters, min_s)
                row[f"L1_{mode}_ms"] = median_ms(ms)
                row[f"L1_{mode}_images_per_s"] = round(1000 * batch / row[f"L1_{mode}_ms"], 1)
                row[f"L1_{mode}_peak_mib"] = peak_mib(run.device)
            out["rows"].append(row)
            run.save()
        if run.left() > 60 and LARGE_IMAGE in images:  # the 4K frame: where decode and resize cost the most
            batch = min(8, max(run.batches))
            large = {"precision": label, "batch": batch, "image": LARGE_IMAGE}
            for mode in modes:
                call = (_l1_gpu_decode if mode == "gpu_decode" else _l1_rows)(services[mode], images[LARGE_IMAGE], batch)
                reset_peak(run.device)
                ms = timed(call, run.device, warm, iters, min_s)
                large[f"L1_{mode}_images_per_s"] = round(1000 * batch / median_ms(ms), 1)
                large[f"L1_{mode}_peak_mib"] = peak_mib(run.device)
            out["large"].append(large)
        del pipes, services
        reset_peak(run.device)
    ratio_row = next((r for r in out["rows"] if r["precision"] == ("fp16" if run.cuda else "fp32") and r["batch"] == 32), None)
    if ratio_row is not None:
        out["L1_over_L0_batch32"] = {
            "precision": ratio_row["precision"], "target": L1_L0_TARGET,
            **{mode: round(ratio_row[f"L1_{mode}_images_per_s"] / ratio_row["L0_images_per_s"], 3) for mode in modes},
        }
    return out


def _shapes(data: bytes) -> list[bytes]:
    """``data`` and three JPEGs made from it whose network inputs differ in shape: turned 90 degrees, a square crop
    and a wide crop (with bus.jpg at 640: 640x480, 480x640, 640x640, 320x640)."""
    image = decode_image(data)
    h, w = image.shape[:2]
    side = min(h, w)
    variants = [cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE), image[:side, :side], image[: w // 2, :]]
    return [data] + [cv2.imencode(".jpg", v, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for v in variants]


def section_overlap(run: Run) -> dict:
    """L1 of one batch that mixes four input shapes (four forwards), with the overlap of ``handler/runtime/overlap.py``
    on (the next group's input made on a side stream while the current forward runs) and off (made inline on the
    current stream first), in FP16, with each ``preprocess``."""
    if not run.cuda:
        return {"skipped": "the overlap is CUDA-only (on CPU inputs are made inline)"}
    pose = run.model_dirs()["pose"]
    shapes = _shapes(run.images()[BENCH_IMAGE])
    warm, iters, min_s = (1, 1, 0.0) if run.quick else (2, 5, 1.0)
    out: dict = {"image": BENCH_IMAGE, "precision": "fp16", "groups": len(shapes), "rows": []}
    for preprocess in ("cpu", "device"):
        for per_shape in (1, 8):
            pipe = pipeline(pose, run.device, half=True, preprocess=preprocess)
            service = YoloService(pipe, HandlerConfig(preprocess=preprocess))
            rows = [{"body": d} for d in shapes for _ in range(per_shape)]

            def call() -> None:
                for answer in service.handle(rows).answers:
                    if answer.status != 200:
                        raise RuntimeError(f"overlap: {answer.status} {answer.body}")

            row: dict = {"preprocess": preprocess, "batch": len(rows)}
            row["on_ms"] = median_ms(timed(call, run.device, warm, iters, min_s))
            stream, pipe.side.stream = pipe.side.stream, None  # off: SideStream stages inline, as on CPU
            row["off_ms"] = median_ms(timed(call, run.device, warm, iters, min_s))
            pipe.side.stream = stream
            row["off_over_on"] = round(row["off_ms"] / row["on_ms"], 3)
            out["rows"].append(row)
    return out


def section_batch_delay(run: Run) -> dict:
    """The in-process side of ``maxBatchDelay``: how long a batch of B takes (L1) and how much of B lone
    requests' time it saves. A frontend that waits ``d`` ms to fill a batch costs a lone request ``d``; once
    requests queue while a batch runs, batches fill without waiting. So ``d`` above one batch-1 L1 time buys
    nothing at low load, and under load the queue decides. The served curve is measured there (bench/batch_delay.py)."""
    rows = run.results.get("throughput", {}).get("rows", [])
    if not rows:
        return {"skipped": "no throughput rows"}
    out: dict = {"rule": "maxBatchDelay <= one batch-1 L1 time: waiting longer than serving a lone request never pays at low load"}
    for label in sorted({r["precision"] for r in rows}):
        for mode in ("cpu", "device", "gpu_decode"):
            key = f"L1_{mode}_ms"
            series = {r["batch"]: r[key] for r in rows if r["precision"] == label and key in r}
            if 1 not in series:
                continue
            t1 = series[1]
            out[f"{label}_{mode}"] = {
                "batch1_ms": t1,
                "per_batch": [{"batch": b, "ms": t, "ms_per_image": round(t / b, 3), "saved_vs_singles_ms": round(b * t1 - t, 2)}
                              for b, t in sorted(series.items())],
                "suggested_max_batch_delay_ms": round(t1, 1),
            }
    return out
