"""The correctness sections: environment, the carried files, the CUDA test cases, letterbox pixels, FP32 and FP16
against the CPU reference, and decoding on the device."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from bench.gpu_check import EAGER_FILE, FP16_MAX_DSCORE, FP16_MIN_IOU, FP32_MIN_IOU, FP32_TOL, REFERENCE_FILE
from bench.gpu_check.compare import compare, fp16_ok, fp32_ok, match_rows
from bench.gpu_check.run import REPO, Run
from handler.contract import BACKBONE_FILE, METADATA_FILE, POSTPROCESS_FILE, check_metadata
from handler.image.decode import decode_image
from handler.pipeline import YoloPipeline


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
        "graph_executor_optimize": torch._C._get_graph_executor_optimize(),
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


def pythonpath() -> str:
    """This repo first, then whatever the caller had (the carried wheels' folder)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def section_tests(run: Run, pytest_k: str | None) -> dict:
    """The CUDA cases of the two test files (and everything else in them that needs no Ultralytics)."""
    junit = run.out / "pytest.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/test_letterbox_torch.py", "tests/test_preprocess_device.py",
           "-m", "gpu or not slow", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if pytest_k:
        cmd += ["-k", pytest_k]
    env = dict(os.environ, YOLO_GPU_CHECK_EXPORTS=str(run.work), PYTHONPATH=pythonpath())
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


def pipeline(model_dir: Path, device: torch.device, half: bool = False, preprocess: str = "cpu") -> YoloPipeline:
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
    result: dict = {"criteria": {"min_iou": FP32_MIN_IOU, "max_dscore": FP32_TOL}, "models": {}}
    for name, model_dir in run.model_dirs().items():
        ref = torch.load(model_dir / REFERENCE_FILE, weights_only=True)
        kind, options = ref["kind"], run.manifest["models"][name]["options"]
        variants: dict[str, dict] = {}
        cpu_here = _outputs(pipeline(model_dir, torch.device("cpu")), images, options, kind)
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
                outs = _outputs(pipeline(model_dir, run.device, preprocess=preprocess), images, options, kind)
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
        fp32 = _outputs(pipeline(model_dir, run.device), images, options, kind)
        fp16 = _outputs(pipeline(model_dir, run.device, half=True), images, options, kind)
        per_image = {n: compare(kind, fp32[n], fp16[n]) for n in images}
        vs_cpu = {n: compare(kind, ref["outputs"][n], fp16[n]) for n in images}
        result["models"][name] = {
            "kind": kind, "vs_fp32": per_image, "pass": all(fp16_ok(kind, c) for c in per_image.values()),
            "vs_cpu_reference": vs_cpu, "pass_vs_cpu_reference": all(fp16_ok(kind, c) for c in vs_cpu.values()),
        }
    result["pass"] = all(m["pass"] and m["pass_vs_cpu_reference"] for m in result["models"].values())
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
    pipe = pipeline(pose, run.device, preprocess="device")
    cv = _outputs(pipe, images, options, "rows")
    gd = _outputs(pipe, images, options, "rows", decoded)
    out["detections_vs_opencv_decode"] = {n: match_rows(cv[n], gd[n]) for n in images}
    out["opencv_decode_vs_reference"] = {n: match_rows(ref["outputs"][n], cv[n]) for n in images}
    return out
