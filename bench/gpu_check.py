"""The GPU checks and figures, written as one JSON and a markdown summary.

    python3 -m bench.gpu_check [--exports exports/gpu_check] [--out DIR] [--device cuda:0|cpu] [--quick]

It runs on a CUDA machine that has torch, torchvision, OpenCV and numpy but no Ultralytics, TorchServe or
Java, from the folder ``python -m bench.gpu_prepare`` wrote here (the exported pairs, their CPU reference
outputs, the test images) and this repo's ``handler/`` package, in process. ``--device cpu`` is the dry run
that ``tests/test_gpu_check.py`` makes on a CPU machine: every section runs, the CUDA-only ones say why
they were skipped. See ``docs/gpu.md`` for the command the device tool runs.

Sections, in order (the JSON is rewritten after each, so a run cut short keeps what it measured):

1. ``environment``: device, driver, torch, CUDA, cuDNN, OpenCV, date.
2. ``artifacts``: the carried files' hashes, and whether this torch loads each TorchScript file; a
   ``postprocess.pt`` it cannot load is scripted again here from ``postprocess_eager.pt`` (the same module,
   from this repo's ``export/`` source) and the run goes on with that.
3. ``tests``: ``tests/test_letterbox_torch.py`` and ``tests/test_preprocess_device.py`` (their CUDA cases and
   the slow pipeline case, on the carried export) under pytest.
4. ``letterbox``: OpenCV here and the torch letterbox on the device against the pixels OpenCV made where the
   reference was written.
5. ``fp32``: FP32 on the device against the CPU reference (same detections, values within 1e-3), with
   cuDNN's TF32 on (the default) and off, and ``preprocess: device`` against ``cpu`` (bit for bit).
6. ``fp16``: FP16 against FP32 on the device (matched IoU >= 0.99, |dscore| <= 0.01).
7. ``gpu_decode``: torchvision's ``decode_jpeg`` on the device (nvJPEG) against OpenCV: pixels and detections.
8. ``throughput``: batches 1/8/32/64 in FP32 and FP16: L0 (backbone only) images/s and peak memory; L1
   (bytes -> JSON through ``YoloService``) with ``preprocess`` cpu and device, and with GPU decode; the
   3840x2160 frame at batch 8; L1/L0 at batch 32 FP16 (target >= 0.5).
9. ``gpu_id``: a worker (``YoloHandler.initialize`` with TorchServe's context, in a child process) started with
   ``gpu_id 0`` allocates only on that device; CUDA hidden: the load fails, or serves on CPU with cpu_fallback.
10. ``batch_delay``: what the per-batch L1 times say about ``maxBatchDelay``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a file or as -m from the repo root alike

from bench.stats import median  # noqa: E402
from export.matching import greedy_match  # noqa: E402
from handler.config import HandlerConfig  # noqa: E402
from handler.contract import BACKBONE_FILE, METADATA_FILE, POSTPROCESS_FILE, check_metadata  # noqa: E402
from handler.image.decode import decode_image  # noqa: E402
from handler.pipeline import YoloPipeline  # noqa: E402
from handler.response import encode_response  # noqa: E402
from handler.service import PreparedRequest, YoloService  # noqa: E402

EAGER_FILE = "postprocess_eager.pt"
REFERENCE_FILE = "reference.pt"
MANIFEST_FILE = "manifest.json"
JSON_FILE = "gpu_check.json"
MD_FILE = "gpu_check.md"

# The pass criteria (docs/gpu.md)
FP32_TOL = 1e-3  # |value| difference, FP32 on the device vs the CPU reference (pixels, scores, probabilities)
FP16_MIN_IOU = 0.99
FP16_MAX_DSCORE = 0.01
L1_L0_TARGET = 0.5
BENCH_IMAGE = "bus.jpg"  # 810x1080 -> 640x480 input
LARGE_IMAGE = "frame_3840x2160.jpg"


# ---------------------------------------------------------------- the run


@dataclass
class Run:
    """One run's settings, where it writes, and what it found so far."""

    exports: Path  # the carried folder (read only)
    out: Path
    device: torch.device
    batches: list[int]
    quick: bool
    deadline: float  # time.monotonic() after which sections are skipped
    work: Path = Path()  # a writable copy of the exports (re-scripted files go here)
    manifest: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def model_dirs(self) -> dict[str, Path]:
        return {name: self.work / m["dir"] for name, m in self.manifest["models"].items()}

    def images(self) -> dict[str, bytes]:
        return {name: (self.work / "images" / name).read_bytes() for name in self.manifest["images"]}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (JSON_FILE + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        tmp.replace(self.out / JSON_FILE)
        (self.out / MD_FILE).write_text(summary(self.results))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def timed(fn: Callable[[], Any], device: torch.device, warm: int, min_iters: int, min_s: float, max_iters: int = 200) -> list[float]:
    """Milliseconds of each timed call of ``fn`` (device synchronised around it), after ``warm`` calls."""
    for _ in range(warm):
        fn()
    _sync(device)
    ms: list[float] = []
    start = time.perf_counter()
    while len(ms) < max_iters and (len(ms) < min_iters or time.perf_counter() - start < min_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ms.append((time.perf_counter() - t0) * 1000)
    return ms


def _median(values: list[float]) -> float:
    return round(median(values), 3)


# ---------------------------------------------------------------- comparing outputs


def match_rows(ref: Tensor, other: Tensor) -> dict:
    """Detections ``rows: float32[n, ncols]`` (x1, y1, x2, y2, score, class_id, then the task's columns; see
    ``export/postprocess.py``) matched as ``export.matching.greedy_match`` matches them (any IoU above 0).
    Returns counts, the smallest matched IoU, the largest |dscore|, the largest |d| over all columns, and over
    the columns after the sixth (keypoints: x, y, visibility)."""
    ref, other = ref.double().numpy(), other.double().numpy()
    ious, dscores, dall, dextra = [], [], [], []
    for i, j, iou in greedy_match(ref, other, 0.0):
        ious.append(iou)
        dscores.append(abs(float(ref[i, 4] - other[j, 4])))
        diff = np.abs(ref[i] - other[j])
        dall.append(float(diff.max()))
        if ref.shape[1] > 6:
            dextra.append(float(diff[6:].max()))
    return {
        "ref": len(ref), "other": len(other), "matched": len(ious),
        "min_iou": round(min(ious), 6) if ious else None,
        "max_dscore": max(dscores) if dscores else None,
        "max_abs_diff": max(dall) if dall else None,
        "max_abs_diff_extra": max(dextra) if dextra else None,
    }


def compare_top(ref: Tensor, other: Tensor) -> dict:
    """Classify ``top: float32[k, 2]`` (class_id, probability): same ids in order, and the largest |dp| of the
    reference's classes (looked up by id, so a reordering of near-equal probabilities is still measured)."""
    ids_ref, ids_other = ref[:, 0].long().tolist(), other[:, 0].long().tolist()
    lookup = {c: float(p) for c, p in other.tolist()}
    dps = [abs(float(p) - lookup[int(c)]) for c, p in ref.tolist() if int(c) in lookup]
    return {"same_ids": ids_ref == ids_other, "common": len(dps), "k": len(ids_ref), "max_dp": max(dps) if dps else None}


def compare(kind: str, ref: Tensor, other: Tensor) -> dict:
    return match_rows(ref, other) if kind == "rows" else compare_top(ref, other)


def fp32_ok(kind: str, c: dict) -> bool:
    if kind == "rows":
        same = c["ref"] == c["other"] == c["matched"]
        return same and (c["max_abs_diff"] is None or c["max_abs_diff"] <= FP32_TOL)
    return c["same_ids"] and c["max_dp"] is not None and c["max_dp"] <= FP32_TOL


def fp16_ok(kind: str, c: dict) -> bool:
    if kind == "rows":
        same = c["ref"] == c["other"] == c["matched"]
        return same and (c["min_iou"] is None or (c["min_iou"] >= FP16_MIN_IOU and c["max_dscore"] <= FP16_MAX_DSCORE))
    return c["common"] == c["k"] and c["max_dp"] is not None and c["max_dp"] <= FP16_MAX_DSCORE


def _worst(values: list[float | None], pick=max) -> float | None:
    values = [v for v in values if v is not None]
    return pick(values) if values else None


# ---------------------------------------------------------------- loading the carried files


def _jit_load(path: Path, device: torch.device) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        return torch.jit.load(str(path), map_location=device)


def rescript_postprocess(model_dir: Path) -> None:
    """Replace ``postprocess.pt`` by this torch's script of the same eager module (``postprocess_eager.pt``,
    from this repo's ``export/`` source), with the same embedded metadata."""
    metadata = (model_dir / METADATA_FILE).read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.load(model_dir / EAGER_FILE, weights_only=False)
        scripted = torch.jit.script(module.eval())
        torch.jit.save(scripted, str(model_dir / POSTPROCESS_FILE), _extra_files={METADATA_FILE: metadata})


def section_artifacts(run: Run) -> dict:
    out: dict = {"manifest": {k: run.manifest.get(k) for k in ("written", "commit", "versions", "loads_in_other_torch")}, "models": {}}
    bad_hash = [rel for rel, digest in run.manifest["files"].items()
                if hashlib.sha256((run.work / rel).read_bytes()).hexdigest() != digest]
    out["hash_mismatch"] = bad_hash
    for name, model_dir in run.model_dirs().items():
        status: dict[str, str] = {}
        for file in (BACKBONE_FILE, POSTPROCESS_FILE):
            try:
                _jit_load(model_dir / file, torch.device("cpu"))
                status[file] = "loaded"
            except Exception as e:  # noqa: BLE001 - recorded; a postprocessor is re-scripted below
                status[file] = f"load failed: {str(e).strip().splitlines()[0]}"
        if status[POSTPROCESS_FILE] != "loaded":
            rescript_postprocess(model_dir)
            _jit_load(model_dir / POSTPROCESS_FILE, torch.device("cpu"))
            status[POSTPROCESS_FILE] += f"; re-scripted here with torch {torch.__version__} from {EAGER_FILE}"
        check_metadata(json.loads((model_dir / METADATA_FILE).read_text()), str(model_dir / METADATA_FILE))
        out["models"][name] = status
    out["torchscript_from_export_torch_loads"] = all(
        s == "loaded" for m in out["models"].values() for s in m.values())
    return out


# ---------------------------------------------------------------- sections


def section_environment(run: Run) -> dict:
    env: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(run.device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "host": platform.node(),
    }
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError as e:
        env["torchvision"] = f"not importable: {e}"
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                   capability=f"{props.major}.{props.minor}")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            env["nvidia_smi"] = smi.stdout.strip()
            env["driver"] = smi.stdout.strip().split(",")[1].strip() if smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"failed: {e}"
    return env


def _pythonpath() -> str:
    """This repo first, then whatever the caller had (the carried wheels' folder)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def section_tests(run: Run, pytest_k: str | None) -> dict:
    """The CUDA cases of the two test files (and everything else in them that needs no Ultralytics)."""
    junit = run.out / "pytest.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/test_letterbox_torch.py", "tests/test_preprocess_device.py",
           "-m", "gpu or not slow", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if pytest_k:
        cmd += ["-k", pytest_k]
    env = dict(os.environ, YOLO_GPU_CHECK_EXPORTS=str(run.work), PYTHONPATH=_pythonpath())
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(60, int(run.left())))
    out: dict = {"command": " ".join(cmd[1:]), "exit": done.returncode, "seconds": round(time.perf_counter() - t0, 1),
                 "tail": done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else done.stderr.strip().splitlines()[-3:]}
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        cases = suite.findall("testcase")
        out["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        out["passed_cuda"] = sorted(c.get("name") for c in cases if "cuda" in c.get("name", "") and not list(c))
        out["failed"] = [{"name": c.get("name"), "message": (c[0].get("message") or "")[:500]}
                         for c in cases if c.find("failure") is not None or c.find("error") is not None]
        out["skip_reasons"] = sorted({(c.find("skipped").get("message") or "") for c in cases if c.find("skipped") is not None})
    return out


def section_letterbox(run: Run) -> dict:
    from handler.image import letterbox_torch
    from handler.image.letterbox import letterbox

    pose = run.model_dirs()["pose"]
    ref = torch.load(pose / REFERENCE_FILE, weights_only=True)
    meta = json.loads((pose / METADATA_FILE).read_text())
    out: dict = {}
    for name, data in run.images().items():
        image = decode_image(data)
        expected = ref["letterboxed"][name].numpy()
        here, _ = letterbox(image, meta["imgsz"], meta["max_stride"], meta["letterbox"])
        dev, _ = letterbox_torch.letterbox(torch.from_numpy(image).to(run.device), meta["imgsz"], meta["max_stride"], meta["letterbox"])
        out[name] = {
            "shape": list(image.shape),
            "opencv_here_equals_reference": bool(here.shape == expected.shape and np.array_equal(here, expected)),
            "torch_on_device_equals_reference": bool(tuple(dev.shape) == expected.shape and np.array_equal(dev.cpu().numpy(), expected)),
            "torch_on_device_equals_opencv_here": bool(np.array_equal(dev.cpu().numpy(), here)),
        }
    return out


def _pipeline(model_dir: Path, device: torch.device, half: bool = False, preprocess: str = "cpu") -> YoloPipeline:
    return YoloPipeline.from_dir(model_dir, device, half=half, preprocess=preprocess)


def _takes_device_preprocess(model_dir: Path) -> bool:
    """Whether the model's transform has a device version (``YoloPipeline`` refuses ``preprocess: device`` else)."""
    backbone, postprocess, meta = None, None, json.loads((model_dir / METADATA_FILE).read_text())
    try:
        YoloPipeline(backbone, postprocess, meta, "cpu", preprocess="device")
        return True
    except ValueError:
        return False


def _outputs(pipe: YoloPipeline, images: dict[str, bytes], options: dict, kind: str, decoded: dict | None = None) -> dict[str, Tensor]:
    opts = replace(pipe.task.default_options(), **options)
    out = {}
    for name, data in images.items():
        image = decoded[name] if decoded is not None else decode_image(data)
        out[name] = getattr(pipe.infer([pipe.prepare(image, opts)])[0][0], kind)
    return out


def section_fp32(run: Run) -> dict:
    images = run.images()
    result: dict = {"tolerance": FP32_TOL, "models": {}}
    for name, model_dir in run.model_dirs().items():
        ref = torch.load(model_dir / REFERENCE_FILE, weights_only=True)
        kind, options = ref["kind"], run.manifest["models"][name]["options"]
        variants: dict[str, dict] = {}
        cpu_here = _outputs(_pipeline(model_dir, torch.device("cpu")), images, options, kind)
        variants["cpu_here"] = {n: compare(kind, ref["outputs"][n], cpu_here[n]) for n in images}
        runs: list[tuple[str, bool | None, str]] = [("device_cpu_preprocess", None, "cpu")]  # (label, cudnn TF32, preprocess)
        if run.cuda:
            runs.append(("device_cpu_preprocess_tf32_off", False, "cpu"))
        if _takes_device_preprocess(model_dir):
            runs.append(("device_device_preprocess", None, "device"))
        device_out: dict[str, dict[str, Tensor]] = {}
        for label, tf32, preprocess in runs:
            saved = torch.backends.cudnn.allow_tf32
            if tf32 is not None:
                torch.backends.cudnn.allow_tf32 = tf32
            try:
                outs = _outputs(_pipeline(model_dir, run.device, preprocess=preprocess), images, options, kind)
            finally:
                torch.backends.cudnn.allow_tf32 = saved
            device_out[label] = outs
            variants[label] = {n: compare(kind, ref["outputs"][n], outs[n]) for n in images}
        for label, per_image in variants.items():
            per_image["pass"] = all(fp32_ok(kind, c) for c in per_image.values())  # type: ignore[union-attr]
        bit_exact = None
        if "device_device_preprocess" in device_out:
            a, b = device_out["device_cpu_preprocess"], device_out["device_device_preprocess"]
            bit_exact = all(torch.equal(a[n], b[n]) for n in images)
        result["models"][name] = {"kind": kind, "vs_cpu_reference": variants, "device_preprocess_bit_exact": bit_exact}
    result["pass"] = all(m["vs_cpu_reference"]["device_cpu_preprocess"]["pass"] for m in result["models"].values())
    return result


def section_fp16(run: Run) -> dict:
    if not run.cuda:
        return {"skipped": "FP16 is CUDA-only"}
    images = run.images()
    result: dict = {"criteria": {"min_iou": FP16_MIN_IOU, "max_dscore": FP16_MAX_DSCORE}, "models": {}}
    for name, model_dir in run.model_dirs().items():
        ref = torch.load(model_dir / REFERENCE_FILE, weights_only=True)
        kind, options = ref["kind"], run.manifest["models"][name]["options"]
        fp32 = _outputs(_pipeline(model_dir, run.device), images, options, kind)
        fp16 = _outputs(_pipeline(model_dir, run.device, half=True), images, options, kind)
        per_image = {n: compare(kind, fp32[n], fp16[n]) for n in images}
        result["models"][name] = {"kind": kind, "vs_fp32": per_image, "pass": all(fp16_ok(kind, c) for c in per_image.values())}
    result["pass"] = all(m["pass"] for m in result["models"].values())
    return result


def gpu_decode(datas: list[bytes], device: torch.device) -> list[Tensor]:
    """JPEG bytes -> ``uint8[H, W, 3]`` BGR tensors on ``device`` with torchvision's ``decode_jpeg`` (nvJPEG on
    CUDA, in one batched call). No EXIF orientation (OpenCV applies it; the carried images have none)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)  # [3, H, W] RGB each
    return [im.permute(1, 2, 0).flip(2) for im in decoded]  # [H, W, 3] BGR


def section_gpu_decode(run: Run) -> dict:
    try:
        import torchvision.io  # noqa: F401
    except ImportError as e:
        return {"skipped": f"torchvision is not importable: {e}"}
    images = {n: d for n, d in run.images().items() if d[:3] == b"\xff\xd8\xff"}
    pose = run.model_dirs()["pose"]
    ref = torch.load(pose / REFERENCE_FILE, weights_only=True)
    options = run.manifest["models"]["pose"]["options"]
    decoded = dict(zip(images, gpu_decode(list(images.values()), run.device)))
    out: dict = {"decoder": f"torchvision.io.decode_jpeg(device={run.device})", "pixels": {}}
    for name, data in images.items():
        a = decode_image(data).astype(np.int16)
        b = decoded[name].cpu().numpy().astype(np.int16)
        d = np.abs(a - b) if a.shape == b.shape else None
        out["pixels"][name] = {"shape_equal": a.shape == b.shape} if d is None else {
            "shape_equal": True, "max_abs": int(d.max()), "mean_abs": round(float(d.mean()), 4),
            "fraction_differing": round(float((d > 0).mean()), 4)}
    pipe = _pipeline(pose, run.device, preprocess="device")
    cv = _outputs(pipe, images, options, "rows")
    gd = _outputs(pipe, images, options, "rows", decoded)
    out["detections_vs_opencv_decode"] = {n: match_rows(cv[n], gd[n]) for n in images}
    out["opencv_decode_vs_reference"] = {n: match_rows(ref["outputs"][n], cv[n]) for n in images}
    return out


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
        pipes = {mode: _pipeline(pose, run.device, half=half, preprocess="cpu" if mode == "cpu" else "device") for mode in modes}
        services = {mode: YoloService(p, HandlerConfig(preprocess=p.preprocess)) for mode, p in pipes.items()}
        for p in pipes.values():
            p.warmup(1)
        for batch in run.batches:
            if run.left() < 30:
                out.setdefault("cut_short", []).append(f"{label} batch {batch}: budget")
                continue
            row: dict = {"precision": label, "batch": batch}
            _reset_peak(run.device)
            row["L0_ms"] = _median(_l0(pipes["cpu"], bus, batch, warm, iters, min_s))
            row["L0_images_per_s"] = round(1000 * batch / row["L0_ms"], 1)
            row["L0_peak_mib"] = _peak_mib(run.device)
            for mode in modes:
                call = _l1_gpu_decode(services[mode], bus, batch) if mode == "gpu_decode" else _l1_rows(services[mode], bus, batch)
                _reset_peak(run.device)
                ms = timed(call, run.device, warm, iters, min_s)
                row[f"L1_{mode}_ms"] = _median(ms)
                row[f"L1_{mode}_images_per_s"] = round(1000 * batch / row[f"L1_{mode}_ms"], 1)
                row[f"L1_{mode}_peak_mib"] = _peak_mib(run.device)
            out["rows"].append(row)
            run.save()
        if run.left() > 60 and LARGE_IMAGE in images:  # the 4K frame: where decode and resize cost the most
            batch = min(8, max(run.batches))
            large = {"precision": label, "batch": batch, "image": LARGE_IMAGE}
            for mode in modes:
                call = (_l1_gpu_decode if mode == "gpu_decode" else _l1_rows)(services[mode], images[LARGE_IMAGE], batch)
                _reset_peak(run.device)
                ms = timed(call, run.device, warm, iters, min_s)
                large[f"L1_{mode}_images_per_s"] = round(1000 * batch / _median(ms), 1)
                large[f"L1_{mode}_peak_mib"] = _peak_mib(run.device)
            out["large"].append(large)
        del pipes, services
        _reset_peak(run.device)
    ratio_row = next((r for r in out["rows"] if r["precision"] == ("fp16" if run.cuda else "fp32") and r["batch"] == 32), None)
    if ratio_row is not None:
        out["L1_over_L0_batch32"] = {
            "precision": ratio_row["precision"], "target": L1_L0_TARGET,
            **{mode: round(ratio_row[f"L1_{mode}_images_per_s"] / ratio_row["L0_images_per_s"], 3) for mode in modes},
        }
    return out


# The child of section_gpu_id: YoloHandler.initialize with a TorchServe-like context, one request, then where
# memory went. TorchServe's `ts` package is stubbed when it is not installed (the handler only subclasses
# BaseHandler and names MetricTypes.GAUGE).
_GPU_ID_CHILD = r"""
import json, os, sys, types, warnings
warnings.simplefilter("ignore")
repo, model_dir, gpu_id, fallback, image = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
sys.path.insert(0, repo)
try:
    import ts.torch_handler.base_handler  # noqa: F401
    stub = False
except ImportError:
    stub = True
    for name in ("ts", "ts.metrics", "ts.metrics.metric_type_enum", "ts.torch_handler", "ts.torch_handler.base_handler"):
        sys.modules[name] = types.ModuleType(name)
    class BaseHandler:
        def __init__(self):
            self.initialized = False
    class MetricTypes:
        GAUGE = "gauge"
    sys.modules["ts.torch_handler.base_handler"].BaseHandler = BaseHandler
    sys.modules["ts.metrics.metric_type_enum"].MetricTypes = MetricTypes
import torch
from handler.yolo_handler import YoloHandler

class Context:
    def __init__(self):
        self.system_properties = {"model_dir": model_dir, "gpu_id": gpu_id, "batch_size": 1}
        self.model_yaml_config = {"handler": {"warmup": 1, "cpu_fallback": fallback}}
        self.manifest = {"model": {"modelVersion": "1.0"}}
        self.model_name = "yolo"
        self.metrics = None
        self.statuses = {}
    def get_request_header(self, idx, name):
        return None
    def get_all_request_header(self, idx):
        return {}
    def set_response_status(self, code, phrase, idx):
        self.statuses[idx] = code
    def set_response_content_type(self, idx, value):
        pass
    def set_response_header(self, idx, key, value):
        pass

out = {"gpu_id": gpu_id, "cpu_fallback": fallback, "ts_stubbed": stub,
       "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}
try:
    h = YoloHandler()
    ctx = Context()
    h.initialize(ctx)
    answer = json.loads(h.handle([{"body": open(image, "rb").read()}], ctx)[0])
    out["device"] = str(h.device)
    out["answer_keys"] = sorted(answer)
    out["detections"] = len(answer.get("detections", []))
    out["param_devices"] = sorted({str(p.device) for p in h.service.pipeline.backbone.parameters()})
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        out["allocated_mib_by_device"] = {i: round(torch.cuda.memory_allocated(i) / 2**20, 1) for i in range(torch.cuda.device_count())}
        out["reserved_mib_by_device"] = {i: round(torch.cuda.memory_reserved(i) / 2**20, 1) for i in range(torch.cuda.device_count())}
        try:
            import subprocess
            q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            g = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            index = {u.strip(): i.strip() for i, u in (line.split(",") for line in g)}
            mine = [line.split(",") for line in q if line.split(",")[0].strip() == str(os.getpid())]
            out["nvidia_smi_this_process"] = [{"gpu": index.get(u.strip(), u.strip()), "used_mib": m.strip()} for _, u, m in mine]
        except Exception as e:
            out["nvidia_smi_this_process"] = f"unavailable: {e}"
except Exception as e:
    out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
print(json.dumps(out))
"""


def _gpu_id_child(run: Run, gpu_id: int, fallback: bool, hide_cuda: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    image = run.work / "images" / BENCH_IMAGE
    cmd = [sys.executable, "-c", _GPU_ID_CHILD, str(REPO), str(run.model_dirs()["pose"]), str(gpu_id), "1" if fallback else "0", str(image)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"child exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}


def section_gpu_id(run: Run) -> dict:
    out: dict = {}
    gpus = torch.cuda.device_count() if run.cuda else 0
    out["gpu_id_0"] = a = _gpu_id_child(run, 0, fallback=False, hide_cuda=False)
    if run.cuda:
        alloc = a.get("allocated_mib_by_device", {})
        out["gpu_id_0_only_on_device_0"] = bool(
            a.get("device") == "cuda:0" and a.get("param_devices") == ["cuda:0"]
            and alloc.get("0", 0) > 0 and all(v == 0 for k, v in alloc.items() if k != "0"))
        if gpus < 2:
            out["note"] = "one GPU: no other device to stay off; the worker's device, its weights and its allocations are checked"
        else:
            out["gpu_id_1"] = b = _gpu_id_child(run, 1, fallback=False, hide_cuda=False)
            alloc = b.get("allocated_mib_by_device", {})
            out["gpu_id_1_only_on_device_1"] = bool(b.get("device") == "cuda:1" and alloc.get("1", 0) > 0
                                                     and all(v == 0 for k, v in alloc.items() if k != "1"))
    out["cuda_hidden_fails"] = _gpu_id_child(run, 0, fallback=False, hide_cuda=True)
    out["cuda_hidden_cpu_fallback"] = _gpu_id_child(run, 0, fallback=True, hide_cuda=True)
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


# ---------------------------------------------------------------- the summary


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 and v != 0 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _md_artifacts(a: dict) -> list[str]:
    lines = ["## Files exported with torch " + str((a["manifest"].get("versions") or {}).get("torch")), ""]
    for name, status in a["models"].items():
        lines.append(f"- {name}: " + "; ".join(f"`{f}` {s}" for f, s in status.items()))
    if a.get("hash_mismatch"):
        lines.append(f"- hash mismatch: {a['hash_mismatch']}")
    return lines


def _md_tests(t: dict) -> list[str]:
    c = t.get("counts", {})
    lines = ["## CUDA suite", "", f"`{t['command']}`: exit {t['exit']}, {c.get('tests', '?')} tests, {c.get('failures', '?')} failures, "
             f"{c.get('errors', '?')} errors, {c.get('skipped', '?')} skipped, {t['seconds']} s", ""]
    lines += [f"- FAILED {f['name']}: {f['message'][:200]}" for f in t.get("failed", [])]
    if t.get("passed_cuda"):
        lines.append(f"- CUDA cases passed: {len(t['passed_cuda'])}")
    if t.get("skip_reasons"):
        lines.append(f"- skip reasons: {'; '.join(t['skip_reasons'])}")
    return lines


def _md_letterbox(lb: dict) -> list[str]:
    lines = ["## Letterbox pixels against the reference machine's OpenCV", "",
             "| image | OpenCV here | torch on device | torch == OpenCV here |", "|---|---|---|---|"]
    for name, v in lb.items():
        lines.append(f"| {name} | {_fmt(v['opencv_here_equals_reference'])} | {_fmt(v['torch_on_device_equals_reference'])} | "
                     f"{_fmt(v['torch_on_device_equals_opencv_here'])} |")
    return lines


def _md_fp32(f32: dict) -> list[str]:
    lines = [f"## FP32 on the device against the CPU reference (tolerance {f32['tolerance']}): {'PASS' if f32['pass'] else 'FAIL'}", "",
             "| model | variant | image | ref | other | matched | max abs diff (dp) | pass |", "|---|---|---|---|---|---|---|---|"]
    for name, m in f32["models"].items():
        for variant, per in m["vs_cpu_reference"].items():
            for image, c in per.items():
                if image == "pass":
                    continue
                if m["kind"] == "rows":
                    lines.append(f"| {name} | {variant} | {image} | {c['ref']} | {c['other']} | {c['matched']} | {_fmt(c['max_abs_diff'])} | {_fmt(per['pass'])} |")
                else:
                    lines.append(f"| {name} | {variant} | {image} | top-{c['k']} | same ids {_fmt(c['same_ids'])} | {c['common']} | {_fmt(c['max_dp'])} | {_fmt(per['pass'])} |")
        if m.get("device_preprocess_bit_exact") is not None:
            lines.append(f"| {name} | preprocess device == cpu, bit for bit | all | | | | | {_fmt(m['device_preprocess_bit_exact'])} |")
    return lines


def _md_fp16(f16: dict) -> list[str]:
    lines = [f"## FP16 against FP32 (matched IoU >= {FP16_MIN_IOU}, |dscore| <= {FP16_MAX_DSCORE}): {'PASS' if f16['pass'] else 'FAIL'}", "",
             "| model | image | fp32 | fp16 | matched | min IoU | max abs dscore (dp) | max abs d keypoint | pass |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in f16["models"].items():
        for image, c in m["vs_fp32"].items():
            if m["kind"] == "rows":
                lines.append(f"| {name} | {image} | {c['ref']} | {c['other']} | {c['matched']} | {_fmt(c['min_iou'], 4)} | {_fmt(c['max_dscore'])} | "
                             f"{_fmt(c['max_abs_diff_extra'])} | {_fmt(m['pass'])} |")
            else:
                lines.append(f"| {name} | {image} | top-{c['k']} | same ids {_fmt(c['same_ids'])} | {c['common']} | | {_fmt(c['max_dp'])} | | {_fmt(m['pass'])} |")
    return lines


def _md_gpu_decode(gd: dict) -> list[str]:
    lines = ["## Decode on the device (nvJPEG) against OpenCV", "", f"decoder: `{gd['decoder']}`", "",
             "| image | max abs px | mean abs px | pixels differing | detections (cv / gpu / matched) | min IoU | max abs dscore |", "|---|---|---|---|---|---|---|"]
    for name, p in gd["pixels"].items():
        d = gd["detections_vs_opencv_decode"][name]
        lines.append(f"| {name} | {_fmt(p.get('max_abs'))} | {_fmt(p.get('mean_abs'))} | {_fmt(p.get('fraction_differing'))} | "
                     f"{d['ref']} / {d['other']} / {d['matched']} | {_fmt(d['min_iou'], 4)} | {_fmt(d['max_dscore'])} |")
    return lines


def _md_throughput(tp: dict) -> list[str]:
    if not tp.get("rows"):
        return ["## Throughput", "", "no rows measured"]
    modes = [m for m in ("cpu", "device", "gpu_decode") if f"L1_{m}_images_per_s" in tp["rows"][0]]
    lines = [f"## Throughput ({tp['image']}, images/s; peak MiB)", "",
             "| precision | batch | L0 | L0 peak | " + " | ".join(f"L1 {m}" for m in modes) + " | " + " | ".join(f"L1 {m} peak" for m in modes) + " |",
             "|---|---|---|---|" + "---|" * (2 * len(modes))]
    for row in tp["rows"]:
        lines.append(f"| {row['precision']} | {row['batch']} | {_fmt(row['L0_images_per_s'])} | {_fmt(row['L0_peak_mib'])} | "
                     + " | ".join(_fmt(row[f"L1_{m}_images_per_s"]) for m in modes) + " | "
                     + " | ".join(_fmt(row[f"L1_{m}_peak_mib"]) for m in modes) + " |")
    lines.append("")
    if tp.get("L1_over_L0_batch32"):
        q = tp["L1_over_L0_batch32"]
        lines += [f"L1/L0 at batch 32 {q['precision']} (target >= {q['target']}): " + ", ".join(f"{m} {q[m]}" for m in modes), ""]
    for row in tp.get("large", []):
        lines.append(f"- {row['image']} batch {row['batch']} {row['precision']}: " + ", ".join(
            f"L1 {m} {_fmt(row[f'L1_{m}_images_per_s'])} img/s (peak {_fmt(row[f'L1_{m}_peak_mib'])} MiB)" for m in modes))
    if tp.get("cut_short"):
        lines.append(f"- not measured (time budget): {', '.join(tp['cut_short'])}")
    return lines


def _md_gpu_id(g: dict) -> list[str]:
    lines = ["## gpu_id", ""]
    for key, v in g.items():
        if isinstance(v, dict):
            brief = {k: v[k] for k in ("device", "param_devices", "allocated_mib_by_device", "nvidia_smi_this_process", "error", "ts_stubbed") if k in v}
            lines.append(f"- {key}: `{json.dumps(brief)}`")
        else:
            lines.append(f"- {key}: {_fmt(v)}")
    return lines


def _md_batch_delay(bd: dict) -> list[str]:
    lines = ["## maxBatchDelay, from the in-process L1 times", "", bd["rule"], ""]
    for key, v in bd.items():
        if isinstance(v, dict):
            per = ", ".join(f"B{p['batch']} {p['ms']} ms ({p['ms_per_image']}/img)" for p in v["per_batch"])
            lines.append(f"- {key}: batch-1 L1 {v['batch1_ms']} ms -> maxBatchDelay <= {v['suggested_max_batch_delay_ms']} ms; {per}")
    return lines


_MD: dict[str, Callable[[dict], list[str]]] = {
    "artifacts": _md_artifacts, "tests": _md_tests, "letterbox": _md_letterbox, "fp32": _md_fp32, "fp16": _md_fp16,
    "gpu_decode": _md_gpu_decode, "throughput": _md_throughput, "gpu_id": _md_gpu_id, "batch_delay": _md_batch_delay,
}


def summary(r: dict) -> str:
    """The markdown of a (possibly partial) result: a header line, then one part per section."""
    env = r.get("environment", {})
    lines = ["# GPU check", "",
             f"{env.get('date', '?')} · {env.get('gpu', env.get('device', '?'))} · driver {env.get('driver', '–')} · "
             f"torch {env.get('torch', '?')} (CUDA {env.get('cuda', '–')}, cuDNN {env.get('cudnn', '–')}) · "
             f"torchvision {env.get('torchvision', '–')} · OpenCV {env.get('opencv', '?')} · {env.get('cpus', '?')} CPUs", ""]
    for name, render in _MD.items():
        section = r.get(name)
        if section is None:
            continue
        if "error" in section:
            lines += [f"## {name}: ERROR", "", f"`{section['error'][:500]}`", ""]
        elif isinstance(section.get("skipped"), str):
            lines += [f"## {name}: skipped", "", section["skipped"], ""]
        else:
            try:
                lines += render(section) + [""]
            except Exception as e:  # noqa: BLE001 - the JSON has it all; the summary must still be written
                lines += [f"## {name}", "", f"(could not render: {type(e).__name__}: {e}; see {JSON_FILE})", ""]
    seconds = r.get("seconds")
    if seconds:
        lines += ["Section times (s): " + ", ".join(f"{k} {v}" for k, v in seconds.items()), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def _section(run: Run, name: str, fn: Callable[[], dict], min_left: float = 20.0) -> None:
    if run.left() < min_left:
        run.results[name] = {"skipped": f"time budget ({run.left():.0f} s left)"}
    else:
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            run.results[name] = fn()
        except Exception as e:  # noqa: BLE001 - recorded, the next sections still run
            run.results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            run.results.setdefault("errors", []).append(name)
        run.results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        print(f"[gpu_check] {name} done in {run.results['seconds'][name]} s", flush=True)
    run.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exports", type=Path, default=REPO / "exports" / "gpu_check", help="the folder bench.gpu_prepare wrote")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "exports" / "gpu_check_out"))
    ap.add_argument("--device", default="cuda:0", help="cuda:N, or cpu for the dry run")
    ap.add_argument("--batches", default=None, help="comma-separated (default 1,8,32,64; cpu: 1,2)")
    ap.add_argument("--quick", action="store_true", help="one warm-up and one timed call per measurement")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting sections after this many seconds")
    ap.add_argument("--pytest-k", default=None, help="pytest -k expression for the tests section")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here; run with --device cpu for the dry run", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 8, 32, 64] if device.type == "cuda" else [1, 2])
    manifest_path = args.exports / MANIFEST_FILE
    if not manifest_path.is_file():
        print(f"{manifest_path} not found: run `python -m bench.gpu_prepare` where Ultralytics is installed, and carry its folder",
              file=sys.stderr)
        return 2
    run = Run(args.exports, args.out, device, batches, args.quick, time.monotonic() + args.budget_s)
    run.manifest = json.loads(manifest_path.read_text())
    run.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    shutil.copytree(args.exports, run.work, dirs_exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    sections: list[tuple[str, Callable[[], dict]]] = [
        ("environment", lambda: section_environment(run)),
        ("artifacts", lambda: section_artifacts(run)),
        ("tests", lambda: section_tests(run, args.pytest_k)),
        ("letterbox", lambda: section_letterbox(run)),
        ("fp32", lambda: section_fp32(run)),
        ("fp16", lambda: section_fp16(run)),
        ("gpu_decode", lambda: section_gpu_decode(run)),
        ("throughput", lambda: section_throughput(run)),
        ("gpu_id", lambda: section_gpu_id(run)),
        ("batch_delay", lambda: section_batch_delay(run)),
    ]
    try:
        for name, fn in sections:
            if name in skip:
                run.results[name] = {"skipped": "--skip"}
                continue
            _section(run, name, fn, min_left=0.0 if name in ("environment", "batch_delay") else 20.0)
    finally:
        shutil.rmtree(run.work, ignore_errors=True)
    print(f"[gpu_check] wrote {run.out / JSON_FILE} and {run.out / MD_FILE}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
