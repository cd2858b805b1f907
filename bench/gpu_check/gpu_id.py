"""The ``gpu_id`` section: a worker started with ``gpu_id N`` allocates only on that device, and with CUDA hidden
the load fails, or serves on CPU with ``cpu_fallback``. Each case is a child process (``gpu_id_child.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.gpu_check import BENCH_IMAGE
from bench.gpu_check.checks import pythonpath
from bench.gpu_check.run import REPO, Run

CHILD = Path(__file__).with_name("gpu_id_child.py")


def _gpu_id_child(run: Run, gpu_id: int, fallback: bool, hide_cuda: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath())
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    image = run.work / "images" / BENCH_IMAGE
    cmd = [sys.executable, str(CHILD), str(REPO), str(run.model_dirs()["pose"]), str(gpu_id), "1" if fallback else "0", str(image)]
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
