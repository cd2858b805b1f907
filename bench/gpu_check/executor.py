"""TorchScript's graph executor on CUDA, optimising (torch's default) against not optimising, each in a child process
(the setting is process-wide, and a graph optimised once stays so).

With optimisation on, TorchScript's profiling executor specialises the graph to each new input (shape, strides, dtype)
it meets, up to its bailout depth, and on CUDA compiles fusion kernels for each specialisation (NNC, through NVRTC).
This section measures what that costs a server that meets several input shapes, and what it buys once warm:

* ``first_calls_ms``: the first 24 backbone calls, FP16, batch 1, cycling over four input shapes;
* ``steady_ms``: the backbone at batch 1, 8 and 32 on the bench image, after those;
* ``l1_first_calls_ms`` and ``l1_steady_ms``: the same for bytes -> JSON through ``YoloService`` (the scripted
  postprocessor runs on the device too);
* ``fp32_vs_cpu_reference``: FP32 detections against the CPU reference (fusion kernels may use other maths).

    python -m bench.gpu_check.executor on|off EXPORTS_DIR [DEVICE]     (one child; prints one JSON line)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.gpu_check import BENCH_IMAGE, REFERENCE_FILE
from bench.gpu_check.run import REPO, Run, median_ms, sync, timed

CALLS = 24


def fix_executor(optimize: bool) -> None:
    """Set TorchScript's graph-executor optimisation for this process and keep it: loading an export on CUDA would
    turn it off (``handler/runtime/device.py`` ``torchscript_executor``, what a worker does), so that step is skipped."""
    from handler.runtime import artifacts

    torch._C._set_graph_executor_optimize(optimize)
    artifacts.torchscript_executor = lambda device: None


def _child(mode: str, exports: Path, device: torch.device) -> dict:
    fix_executor(mode == "on")
    from bench.gpu_check.compare import compare
    from bench.gpu_check.throughput import _l1_rows, _shapes
    from handler.config import HandlerConfig
    from handler.image.decode import decode_image
    from handler.pipeline import YoloPipeline
    from handler.service import YoloService

    manifest = json.loads((exports / "manifest.json").read_text())
    pose = exports / manifest["models"]["pose"]["dir"]
    images = {name: (exports / "images" / name).read_bytes() for name in manifest["images"]}
    out: dict = {"mode": mode, "graph_executor_optimize": torch._C._get_graph_executor_optimize()}

    half = device.type == "cuda"  # FP16 is CUDA-only; the CPU run is the dry run
    pipe = YoloPipeline.from_dir(pose, device, half=half)
    inputs = [pipe.network_input([pipe.prepare(decode_image(d))]) for d in _shapes(images[BENCH_IMAGE])]
    out["shapes"] = [list(x.shape) for x in inputs]
    first = []
    with torch.inference_mode():
        for i in range(CALLS):
            x = inputs[i % len(inputs)]
            sync(device)
            t0 = time.perf_counter()
            pipe.backbone(x)
            sync(device)
            first.append(round((time.perf_counter() - t0) * 1000, 2))
        out["first_calls_ms"] = first
        bus = pipe.prepare(decode_image(images[BENCH_IMAGE]))
        out["steady_ms"] = {}
        for b in (1, 8, 32):
            x = pipe.network_input([bus] * b)
            out["steady_ms"][b] = median_ms(timed(lambda: pipe.backbone(x), device, 3, 20, 0.5))

    service = YoloService(YoloPipeline.from_dir(pose, device, half=half), HandlerConfig())
    variants = _shapes(images[BENCH_IMAGE])
    l1_first = []
    for i in range(CALLS):
        call = _l1_rows(service, variants[i % len(variants)], 1)
        t0 = time.perf_counter()
        call()
        l1_first.append(round((time.perf_counter() - t0) * 1000, 2))
    out["l1_first_calls_ms"] = l1_first
    out["l1_steady_ms"] = {b: median_ms(timed(_l1_rows(service, images[BENCH_IMAGE], b), device, 2, 5, 0.5)) for b in (1, 32)}

    ref = torch.load(pose / REFERENCE_FILE, weights_only=True)
    pipe32 = YoloPipeline.from_dir(pose, device)
    opts = replace(pipe32.task.default_options(), **manifest["models"]["pose"]["options"])
    out["fp32_vs_cpu_reference"] = {}
    for name, data in images.items():
        rows = pipe32.infer([pipe32.prepare(decode_image(data), opts)])[0][0].rows
        out["fp32_vs_cpu_reference"][name] = compare("rows", ref["outputs"][name], rows)
    return out


def section_executor(run: Run) -> dict:
    if not run.cuda:
        return {"skipped": "the fusion kernels of TorchScript's executor are compiled on CUDA only (off by default on CPU)"}
    out: dict = {}
    for mode in ("on", "off"):
        done = subprocess.run([sys.executable, "-m", "bench.gpu_check.executor", mode, str(run.work), str(run.device)], cwd=REPO,
                              capture_output=True, text=True, timeout=max(30.0, run.left()))
        if done.returncode != 0:
            out[mode] = {"error": f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"}
        else:
            out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        run.results["executor"] = out
        run.save()
    return out


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], Path(sys.argv[2]), torch.device(sys.argv[3] if len(sys.argv) > 3 else "cuda:0")), default=str))
