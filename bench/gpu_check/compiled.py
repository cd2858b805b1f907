"""The compiled backbones on CUDA, against the traced TorchScript backbone that the ``.mar`` serves, all in FP16:

* AOTInductor. Its ``.pt2`` is machine code for one torch version and one GPU architecture, so it is not carried.
  What is carried is ``PROGRAM_FILE``: the backbone's ``torch.export`` program (``export/aoti.py``'s
  ``export_program``, FP32 on CPU, written with ``torch.export.save``; a file saved by torch 2.14 loads in 2.11
  with the same outputs, checked where it was written). Here it is made FP16 on the device, exported again with
  the same dynamic dimensions, and compiled with the options ``export/aoti.py`` uses (freezing on).
* CUDA graphs of the TorchScript FP16 backbone: one capture per batch size at the bench image's input shape,
  replayed into the same static output tensors. A graph is fixed to its shapes, so serving would pad each batch to
  captured (B, H, W) buckets; this measures what the replay saves before any such code is written.

Both are compared with the TorchScript FP16 forward on the same input: the raw outputs (max abs difference) and,
for AOTInductor, the detections after the same postprocessor on every carried image (``compare.match_rows``).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from bench.gpu_check import BENCH_IMAGE, PROGRAM_FILE
from bench.gpu_check.checks import pipeline
from bench.gpu_check.compare import compare, fp16_ok
from bench.gpu_check.run import REPO, Run, median_ms, timed
from handler.image.decode import decode_image
from handler.pipeline import YoloPipeline
from handler.runtime.aoti import AOTI_MAX_BATCH, AOTI_MAX_SIDE, AotiBackbone

COMPILE_MIN_LEFT_S = 90.0  # AOTInductor's compile of yolo11n with dynamic B, H, W: start it only with this much left


def _raw_diff(a: tuple, b: tuple) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def compile_fp16(program_path: Path, package_path: Path, device: torch.device, stride: int, freezing: bool) -> None:
    """The carried program made FP16 on ``device``, exported again with the dynamic dimensions of ``export/aoti.py``,
    and compiled by AOTInductor into ``package_path``."""
    program = torch.export.load(str(program_path))
    module = program.module().to(device).half()
    batch = torch.export.Dim("batch", min=1, max=AOTI_MAX_BATCH)
    h_cells = torch.export.Dim("h_cells", min=1, max=AOTI_MAX_SIDE // stride)
    w_cells = torch.export.Dim("w_cells", min=1, max=AOTI_MAX_SIDE // stride)
    example = torch.rand(2, 3, 640, 640, device=device).half().contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half_program = torch.export.export(module, (example,), dynamic_shapes=({0: batch, 2: stride * h_cells, 3: stride * w_cells},))
        torch._inductor.aoti_compile_and_package(half_program, package_path=str(package_path), inductor_configs={"freezing": freezing})


def _aoti_fp16(run: Run, stride: int, out: dict) -> object:
    """Compile in a child process (a crash there is recorded, not fatal), with freezing and, if that fails, without;
    then load the package here. Records each attempt in ``out["aoti_attempts"]``."""
    package = run.work / "pose" / "backbone_fp16_cuda.pt2"
    attempts = out.setdefault("aoti_attempts", [])
    for freezing in (True, False):
        if run.left() < 60:
            break
        t0 = time.perf_counter()
        cmd = [sys.executable, "-X", "faulthandler", "-m", "bench.gpu_check.compiled", str(run.work / "pose" / PROGRAM_FILE),
               str(package), str(stride), "1" if freezing else "0"]
        try:
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(30.0, run.left() - 30))
            ok, tail = done.returncode == 0, done.stderr.strip()[-2500:]
            code = done.returncode
        except subprocess.TimeoutExpired:
            ok, tail, code = False, "timed out", None
        attempts.append({"freezing": freezing, "exit": code, "seconds": round(time.perf_counter() - t0, 1),
                         **({} if ok else {"stderr_tail": tail})})
        run.save()
        if ok:
            out["aoti_compile_s"] = attempts[-1]["seconds"]
            out["aoti_freezing"] = freezing
            return torch._inductor.aoti_load_package(str(package))
    raise RuntimeError("AOTInductor did not compile; see aoti_attempts")


def _graph(backbone, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
    """``backbone(x)`` captured as a CUDA graph after warm-up calls on a side stream (TorchScript's profiling
    executor settles on its optimised graph after a few calls). Returns the graph and its static outputs."""
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        for _ in range(4):
            backbone(x)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = tuple(backbone(x))
    return graph, static_out


def _cuda_graphs(run: Run, ts16: YoloPipeline, bus, batches: list[int], timing: tuple[int, int, float]) -> list[dict]:
    rows = []
    with torch.inference_mode():
        for b in batches:
            x = ts16.network_input([bus] * b)
            graph, static_out = _graph(ts16.backbone, x)
            graph.replay()
            eager = tuple(ts16.backbone(x))
            row = {"batch": b, "replay_equals_eager_max_abs": _raw_diff(static_out, eager),
                   "torchscript_ms": median_ms(timed(lambda: ts16.backbone(x), run.device, *timing)),
                   "graph_ms": median_ms(timed(graph.replay, run.device, *timing))}
            row["speedup"] = round(row["torchscript_ms"] / row["graph_ms"], 3)
            rows.append(row)
            del graph, static_out
    return rows


def _aoti(run: Run, ts16: YoloPipeline, bus, batches: list[int], timing: tuple[int, int, float], out: dict) -> None:
    """AOTInductor FP16 against TorchScript FP16: compile time, raw outputs and times per batch, detections per image."""
    images = run.images()
    aoti = AotiBackbone(_aoti_fp16(run, ts16.stride, out), run.device, precision="fp16")  # called like the traced backbone
    with torch.inference_mode():
        for b in batches:
            x = ts16.network_input([bus] * b)
            row = {"batch": b, "raw_max_abs_diff": _raw_diff(tuple(ts16.backbone(x)), aoti(x)),
                   "torchscript_ms": median_ms(timed(lambda: ts16.backbone(x), run.device, *timing)),
                   "aoti_ms": median_ms(timed(lambda: aoti(x), run.device, *timing))}
            row["speedup"] = round(row["torchscript_ms"] / row["aoti_ms"], 3)
            out["rows"].append(row)
    aoti_pipe = copy.copy(ts16)
    aoti_pipe.backbone = aoti
    options = run.manifest["models"]["pose"]["options"]
    opts = replace(ts16.task.default_options(), **options)
    detections = {}
    for name, data in images.items():
        image = decode_image(data)
        a = ts16.infer([ts16.prepare(image, opts)])[0][0].rows
        c = aoti_pipe.infer([aoti_pipe.prepare(image, opts)])[0][0].rows
        detections[name] = compare("rows", a, c)
    out["detections_vs_torchscript_fp16"] = detections
    out["detections_pass"] = all(fp16_ok("rows", c) for c in detections.values())


def section_compiled(run: Run) -> dict:
    if not run.cuda:
        return {"skipped": "AOTInductor on CUDA and CUDA graphs are CUDA-only"}
    pose = run.model_dirs()["pose"]
    if not (pose / PROGRAM_FILE).is_file():
        return {"skipped": f"{PROGRAM_FILE} was not carried"}
    images = run.images()
    warm, iters, min_s = (1, 1, 0.0) if run.quick else (3, 5, 1.0)
    ts16: YoloPipeline = pipeline(pose, run.device, half=True)
    bus = ts16.prepare(decode_image(images[BENCH_IMAGE]))
    batches = [b for b in run.batches if b <= AOTI_MAX_BATCH]
    out: dict = {"image": BENCH_IMAGE, "precision": "fp16", "rows": []}

    try:  # CUDA graphs first: they need no compile
        out["cuda_graphs"] = _cuda_graphs(run, ts16, bus, batches, (warm, iters, min_s))
    except Exception as e:  # noqa: BLE001 - recorded; AOTInductor is still measured
        out["cuda_graphs"] = {"error": f"{type(e).__name__}: {e}"}
    run.results["compiled"] = out
    run.save()

    if run.left() < COMPILE_MIN_LEFT_S:
        out["aoti"] = {"skipped": f"time budget ({run.left():.0f} s left, compile needs about {COMPILE_MIN_LEFT_S:.0f})"}
        return out
    try:
        _aoti(run, ts16, bus, batches, (warm, iters, min_s), out)
    except Exception as e:  # noqa: BLE001 - recorded with what was measured before it
        out["aoti"] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
    return out


if __name__ == "__main__":  # the compile child: PROGRAM PACKAGE STRIDE FREEZING(0|1); loads and runs the package once
    _program, _package, _stride, _freezing = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    compile_fp16(_program, _package, torch.device("cuda:0"), _stride, _freezing)
    print("compiled", file=sys.stderr, flush=True)
    _x = torch.rand(1, 3, 640, 480, device="cuda:0").half().contiguous(memory_format=torch.channels_last)
    torch._inductor.aoti_load_package(str(_package))(_x)
    torch.cuda.synchronize()
    print("loaded and ran", file=sys.stderr, flush=True)
