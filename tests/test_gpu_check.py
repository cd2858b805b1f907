"""bench/gpu_prepare.py then python -m bench.gpu_check --device cpu (the dry run): the one GPU command runs end to end
here, and what it writes holds every section, with the CPU checks passing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tools.server import REPO_ROOT

from bench.gpu_check.gpu_id import CHILD
from bench.gpu_check.throughput import _shapes
from handler.image.decode import decode_image
from handler.image.letterbox import letterbox_params

SECTIONS = ["environment", "artifacts", "tests", "letterbox", "fp32", "fp16", "gpu_decode", "executor", "throughput", "gpu_id",
            "batch_delay", "compiled", "overlap"]


@pytest.mark.slow
def test_gpu_check_dry_run_end_to_end(tmp_path):
    exports, out = tmp_path / "exports", tmp_path / "out"
    subprocess.run([sys.executable, "-m", "bench.gpu_prepare", "--out", str(exports), "--no-wheels"], cwd=REPO_ROOT, check=True,
                   capture_output=True, text=True, timeout=900)
    manifest = json.loads((exports / "manifest.json").read_text())
    assert set(manifest["models"]) == {"pose", "cls"} and len(manifest["images"]) == 3
    # the torch.export program that the GPU machine compiles with AOTInductor is the traced backbone's network
    program = torch.export.load(str(exports / "pose" / "backbone_program.pt2")).module()
    traced = torch.jit.load(str(exports / "pose" / "backbone.pt"))
    x = torch.rand(2, 3, 480, 640, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for a, b in zip(program(x), traced(x), strict=True):
            assert a.shape == b.shape and float((a - b).abs().max()) < 1e-3
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--exports", str(exports), "--out", str(out), "--device", "cpu",
                           "--quick", "--pytest-k", "config"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert set(SECTIONS) <= set(result)
    assert "errors" not in result, {k: result[k].get("error") for k in result.get("errors", [])}
    assert result["artifacts"]["hash_mismatch"] == [] and result["artifacts"]["torchscript_from_export_torch_loads"]
    assert result["tests"]["exit"] == 0 and result["tests"]["counts"]["tests"] > 0
    for name, v in result["letterbox"].items():
        assert v["opencv_here_equals_reference"] and v["torch_on_device_equals_reference"] and v["torch_on_device_equals_opencv_here"], name
    assert result["fp32"]["pass"], result["fp32"]
    assert result["fp32"]["models"]["pose"]["device_preprocess_bit_exact"] is True
    assert result["fp16"] == {"skipped": "FP16 is CUDA-only"}
    assert "CUDA-only" in result["overlap"]["skipped"] and "CUDA-only" in result["compiled"]["skipped"]
    assert "CUDA only" in result["executor"]["skipped"]
    rows = result["throughput"]["rows"]
    assert [(r["precision"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 2)]
    for r in rows:  # each figure is the batch over its measured time, and the batch-delay section reads the same times
        for level in ("L0", "L1_cpu", "L1_device"):
            assert r[f"{level}_ms"] > 0 and r[f"{level}_images_per_s"] == pytest.approx(1000 * r["batch"] / r[f"{level}_ms"], rel=0.01)
    per_batch = result["batch_delay"]["fp32_cpu"]["per_batch"]
    assert [(p["batch"], p["ms"]) for p in per_batch] == [(r["batch"], r["L1_cpu_ms"]) for r in rows]
    assert result["gpu_id"]["cuda_hidden_cpu_fallback"]["device"] == "cpu"  # served on CPU with cpu_fallback
    assert "error" in result["gpu_id"]["cuda_hidden_fails"]  # and refused without it
    md = (out / "gpu_check.md").read_text()
    for heading in ("## CUDA suite", "## FP32 on the device", "## Throughput", "## gpu_id", "## maxBatchDelay"):
        assert heading in md


def test_overlap_batch_mixes_four_input_shapes(images):
    """The overlap section's batch has one forward per input shape: four different letterboxed shapes."""
    variants = _shapes(images["bus.jpg"])
    shapes = set()
    for data in variants:
        h, w = decode_image(data).shape[:2]
        p = letterbox_params((h, w), 640)
        shapes.add((p.input_h, p.input_w))
    assert len(variants) == 4 and len(shapes) == 4, shapes


@pytest.mark.slow
def test_gpu_id_child_serves_with_its_torchserve_stub(pose_export, sample_images):
    """The GPU machine has no TorchServe: the worker child stubs every ``ts`` module the handler imports. Here ``ts`` is
    made unimportable, so the stub is what runs; with CUDA hidden and cpu_fallback it serves on CPU."""
    code = ("import runpy, sys; sys.modules['ts'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    cmd = [sys.executable, "-c", code, str(CHILD), str(REPO_ROOT), str(pose_export.out_dir), "0", "1", str(sample_images[0])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ts_stubbed"] is True and "error" not in out, out
    assert out["device"] == "cpu" and out["detections"] > 0
