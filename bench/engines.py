"""Each CPU engine in a process of its own, the engines alternating in chunks: ``python -m bench.cpu_reference``.

Why processes: after a call, torch's OpenMP threads spin for a while and steal the cores from whatever runs next in the
same process (ONNX Runtime, OpenVINO); in one process the engine that follows torch is measured slower than it is.

The parent starts one child per engine (``python -m bench.engines ENGINE ...``), each pinned to the run's CPUs (one
thread: ``taskset``-style affinity to one core) with the run's thread count set explicitly in every engine (torch
``set_num_threads`` through the worker's own policy, ORT ``intra_op_num_threads``, OpenVINO ``INFERENCE_NUM_THREADS``).
A child loads its engine, reports load time and RSS, times its first calls (``bus.jpg`` then ``zidane.jpg``: each a new
input shape), then waits. The parent asks each child in turn for a chunk of timed calls, several rounds, so machine noise
hits every engine alike, and only one engine runs at a time. A child reports the CPU-seconds its process used per second
of wall time over each chunk: the check that the thread policy holds for every runtime.

Per call, two figures: **file -> detections** (the JPEG file to detections, alternating ``bus.jpg`` and ``zidane.jpg``:
``YoloService.predict`` for ours, ``YOLO(...).predict`` for Ultralytics') and the **raw forward** of ``bus.jpg``
letterboxed to ``float32[1, 3, 640, 480]`` (our backbone runtime; Ultralytics' session or compiled model).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

# found without importing ultralytics: our children must not pay its import in their RSS (a worker never imports it)
ASSETS = Path(find_spec("ultralytics").submodule_search_locations[0]) / "assets"
IMAGES = [ASSETS / "bus.jpg", ASSETS / "zidane.jpg"]
IMGSZ = 640
MARK = "@@engine "  # the child's answers; whatever else a library prints on stdout is skipped


@dataclass(frozen=True)
class Engine:
    """One engine of the comparison: ``kind`` ``ours`` (an export directory + runtime) or ``ultralytics`` (a model
    path + the OpenVINO precision hint, None: the runtime's own default)."""

    name: str
    kind: str
    path: str
    runtime: str = "auto"
    hint: str | None = None


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------- inside a child


def _ours(engine: Engine, threads: int) -> tuple[Callable, Callable, str, str]:
    import torch

    from handler.config import HandlerConfig
    from handler.image.decode import decode_image
    from handler.runtime.device import CPU, set_threads
    from handler.service import YoloService

    set_threads(threads, CPU, None)  # the worker's thread policy, as the handler applies it before the load
    service = YoloService.from_dir(engine.path, HandlerConfig(runtime=engine.runtime, warmup=0))
    pipeline = service.pipeline
    x = pipeline.to_input([pipeline.prepare(decode_image(IMAGES[0].read_bytes())).pixels])
    blobs = [p.read_bytes() for p in IMAGES]

    def forward() -> None:
        with torch.inference_mode():
            pipeline.backbone(x)

    def file(i: int) -> None:
        answer = service.predict(blobs[i % 2])
        if answer.status != 200:
            raise RuntimeError(answer.body)

    return file, forward, service.describe()["precision"], pipeline.runtime


def _ultralytics(engine: Engine, threads: int) -> tuple[Callable, Callable, str, str]:
    import numpy as np
    import torch
    from ultralytics import YOLO

    from ultralytics.utils import NUM_THREADS

    path = Path(engine.path)
    # YOLO(pt): torch is the engine, at the run's threads. The others: the runtime gets the run's threads, torch (the
    # NMS) what Ultralytics sets for itself, min(8, cores - 1), as ours keeps torch at 1 beside OpenVINO
    torch_threads = threads if path.suffix == ".pt" else min(threads, NUM_THREADS)
    torch.set_num_threads(torch_threads)
    model = YOLO(str(path), task="pose")
    model.predict(str(IMAGES[0]), imgsz=IMGSZ, verbose=False)  # builds the predictor and its backend
    backend = model.predictor.model.backend
    precision, runtime = "fp32", "torch"
    if hasattr(backend, "session"):  # ONNX Runtime, rebuilt with the run's threads
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        backend.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        runtime = "onnxruntime"
        name = backend.session.get_inputs()[0].name
        raw = lambda x: backend.session.run(None, {name: x})  # noqa: E731
    elif hasattr(backend, "ov_compiled_model"):
        import openvino as ov

        core = ov.Core()
        cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        if engine.hint:
            cfg["INFERENCE_PRECISION_HINT"] = engine.hint
        backend.compile_model = lambda m: core.compile_model(m, "CPU", cfg)
        backend.ov_compiled_model = backend.compile_model(core.read_model(str(next(path.glob("*.xml")))))
        got = backend.ov_compiled_model.get_property("INFERENCE_PRECISION_HINT").to_string()  # "f32" | "bf16"
        precision = "int8" if "int8" in path.name else {"bf16": "bf16", "f32": "fp32"}.get(got, got)
        runtime = "openvino"
        raw = lambda x: backend.ov_compiled_model(x)  # noqa: E731
    else:
        net = backend.model if hasattr(backend, "model") else model.model

        def raw(x):
            with torch.inference_mode():
                net(torch.from_numpy(x))

    x = np.random.default_rng(0).random((1, 3, 640, 480), dtype=np.float32)

    def file(i: int) -> None:
        torch.set_num_threads(torch_threads)  # Ultralytics' predictor may change it
        model.predict(str(IMAGES[i % 2]), imgsz=IMGSZ, verbose=False)

    return file, lambda: raw(x), precision, runtime


def child(engine: Engine, threads: int, pin: int | None) -> None:
    """The child's loop: load, report, then answer ``chunk N`` lines with timings until ``quit``."""
    import warnings

    warnings.simplefilter("ignore")
    if pin is not None:
        os.sched_setaffinity(0, {pin})
    r0, t0 = rss_mb(), time.perf_counter()
    load = _ours if engine.kind == "ours" else _ultralytics
    file, forward, precision, runtime = load(engine, threads)
    load_s = time.perf_counter() - t0
    first = []
    for i in range(2):  # bus.jpg (640x480), zidane.jpg (384x640): two new input shapes
        t1 = time.perf_counter()
        file(i)
        first.append(round((time.perf_counter() - t1) * 1000, 1))
    for i in range(4):  # warm up
        file(i)
        forward()
    print(MARK + json.dumps({"ready": True, "load_s": round(load_s, 2), "rss_mb": round(rss_mb(), 1), "rss_load_mb": round(rss_mb() - r0, 1),
                      "first_calls_ms": first, "precision": precision, "runtime": runtime}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            return
        n = int(cmd[1])
        c0, w0 = cpu_seconds(), time.perf_counter()
        files_ms: list[list[float]] = [[], []]  # bus.jpg, zidane.jpg
        fwd_ms = []
        for i in range(n):
            t1 = time.perf_counter()
            file(i)
            files_ms[i % 2].append((time.perf_counter() - t1) * 1000)
            t1 = time.perf_counter()
            forward()
            fwd_ms.append((time.perf_counter() - t1) * 1000)
        cpu_per_wall = (cpu_seconds() - c0) / (time.perf_counter() - w0)
        print(MARK + json.dumps({"file_ms": files_ms, "forward_ms": fwd_ms, "cpu_per_wall": round(cpu_per_wall, 3)}), flush=True)


# ---------------------------------------------------------------- the parent


class Child:
    def __init__(self, engine: Engine, threads: int, pin: int | None) -> None:
        cmd = [sys.executable, "-m", "bench.engines", json.dumps(engine.__dict__), str(threads), "-1" if pin is None else str(pin)]
        self.engine = engine
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parent.parent)
        self.ready = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"engine {self.engine.name} exited ({self.proc.wait()}) before answering")
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])

    def chunk(self, n: int) -> dict:
        self.proc.stdin.write(f"chunk {n}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def run(engines: list[Engine], threads: int, chunks: int, calls: int, pin: int | None, log: Callable[[str], None] = print) -> dict:
    """One run at ``threads``: every engine in its own process, ``chunks`` rounds of ``calls`` calls each, engines in
    turn. Returns ``{engine name: {p50s, precision, load, first calls, rss, cpu_per_wall}}``."""
    children: list[Child] = []
    try:
        for e in engines:
            children.append(Child(e, threads, pin))
            log(f"  {e.name}: {children[-1].ready}")
        samples = {c.engine.name: {"file_ms": [], "bus_ms": [], "zidane_ms": [], "forward_ms": [], "cpu_per_wall": []} for c in children}
        for _ in range(chunks):
            for c in children:
                time.sleep(0.2)
                got = c.chunk(calls)
                s = samples[c.engine.name]
                bus, zidane = got["file_ms"]
                s["file_ms"] += bus + zidane
                s["bus_ms"] += bus
                s["zidane_ms"] += zidane
                s["forward_ms"] += got["forward_ms"]
                s["cpu_per_wall"].append(got["cpu_per_wall"])
    finally:
        for c in children:
            c.close()
    out = {}
    for c in children:
        s = samples[c.engine.name]
        out[c.engine.name] = {
            **{k: c.ready[k] for k in ("precision", "runtime", "load_s", "rss_mb", "first_calls_ms")},
            "file_p50_ms": round(statistics.median(s["file_ms"]), 2),
            "bus_p50_ms": round(statistics.median(s["bus_ms"]), 2),
            "zidane_p50_ms": round(statistics.median(s["zidane_ms"]), 2),
            "forward_p50_ms": round(statistics.median(s["forward_ms"]), 2),
            "cpu_per_wall": round(statistics.median(s["cpu_per_wall"]), 2),
        }
    return out


def reference_of(precision: str, results: dict) -> tuple[str, float] | None:
    """The Ultralytics engine a precision is compared with: FP32 -> the fastest FP32 ``YOLO(...)``; bf16 -> ``YOLO``'s
    OpenVINO default; int8 -> ``YOLO``'s OpenVINO INT8 (file -> detections p50)."""
    ultra = {k: v for k, v in results.items() if k.startswith("YOLO(")}
    same = {k: v for k, v in ultra.items() if v["precision"] == precision}
    if precision == "bf16":
        same = {k: v for k, v in same.items() if "default" in k} or same
    if not same:
        return None
    name = min(same, key=lambda k: same[k]["file_p50_ms"])
    return name, same[name]["file_p50_ms"]


def table(runs: dict[int, dict]) -> str:
    """Markdown: one row per (threads, engine)."""
    lines = ["| threads | engine | precision | file → detections p50 ms (bus, zidane) | × reference (same precision) | "
             "raw forward p50 ms (bus) | bus − forward ms | load s | first calls (bus, zidane) ms | RSS MB | CPU-s / wall-s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for threads, results in runs.items():
        for name, r in results.items():
            ref = reference_of(r["precision"], results)
            ratio = f"{r['file_p50_ms'] / ref[1]:.2f} ({ref[0]})" if ref and not name.startswith("YOLO(") else "–"
            lines.append(f"| {threads} | {name} | {r['precision']} | {r['file_p50_ms']:.1f} ({r['bus_p50_ms']:.1f}, {r['zidane_p50_ms']:.1f}) | "
                         f"{ratio} | {r['forward_p50_ms']:.1f} | {r['bus_p50_ms'] - r['forward_p50_ms']:.1f} | {r['load_s']:.2f} | "
                         f"{', '.join(str(v) for v in r['first_calls_ms'])} | {r['rss_mb']:.0f} | {r['cpu_per_wall']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    spec, n_threads, pin_cpu = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    child(Engine(**spec), n_threads, None if pin_cpu < 0 else pin_cpu)
