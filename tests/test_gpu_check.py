"""bench/gpu_prepare.py then python -m bench.gpu_check --device cpu (the dry run): the one GPU command runs end to end
here, and what it writes holds every section, with the CPU checks passing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tools.server import REPO_ROOT

SECTIONS = ["environment", "artifacts", "tests", "letterbox", "fp32", "fp16", "gpu_decode", "throughput", "gpu_id", "batch_delay"]


@pytest.mark.slow
def test_gpu_check_dry_run_end_to_end(tmp_path):
    exports, out = tmp_path / "exports", tmp_path / "out"
    subprocess.run([sys.executable, "-m", "bench.gpu_prepare", "--out", str(exports), "--no-wheels"], cwd=REPO_ROOT, check=True,
                   capture_output=True, text=True, timeout=900)
    manifest = json.loads((exports / "manifest.json").read_text())
    assert set(manifest["models"]) == {"pose", "cls"} and len(manifest["images"]) == 3
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
