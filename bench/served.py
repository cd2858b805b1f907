"""Served measurements: archives for S (our handler) and T (the baseline handler), the HTTP load
generator, and the server-side CPU and memory figures.

Both servers run through ``tools/server.py``'s :func:`running_server` with the shipped
``config.properties`` (ports, model store and ``load_models`` overridden), so S and T differ only in
the archive: handler, serialized file and nothing else (same workers, ``batchSize`` and
``maxBatchDelay`` from each archive's ``model-config.yaml``).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import psutil
import torch

from export.archive import BATCH_DELAY_MS, MODEL_CONFIG_FILE, archiver_command, model_config_yaml, stage_handler_code
from tools.server import TorchServe

BASELINE_HANDLER = Path(__file__).resolve().with_name("baseline_handler.py")
# the archive's default for the device the workers run on (export/archive.py), for S and T alike
MAX_BATCH_DELAY_MS = BATCH_DELAY_MS["gpu" if torch.cuda.is_available() else "cpu"]


@dataclass(frozen=True)
class ServerConfig:
    """TorchServe's per-model settings of one measured configuration."""

    workers: int
    batch_size: int
    max_batch_delay_ms: int = MAX_BATCH_DELAY_MS

    @property
    def label(self) -> str:
        return f"w{self.workers}_b{self.batch_size}"


def _with_workers(yaml_text: str, cfg: ServerConfig) -> str:
    """Set ``minWorkers``/``maxWorkers``/``batchSize``/``maxBatchDelay`` in a model-config.yaml text."""
    values = {"minWorkers": cfg.workers, "maxWorkers": cfg.workers, "batchSize": cfg.batch_size, "maxBatchDelay": cfg.max_batch_delay_ms}
    lines = []
    for line in yaml_text.splitlines():
        key = line.split(":", 1)[0]
        lines.append(f"{key}: {values.pop(key)}" if key in values else line)
    lines += [f"{k}: {v}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _run_archiver(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


def build_ours(export_dir: Path, store: Path, name: str, cfg: ServerConfig) -> None:
    """``store/NAME.mar`` of our export with ``cfg``'s workers and batching (README archiver command)."""
    config = store / f"{name}-{MODEL_CONFIG_FILE}"
    store.mkdir(parents=True, exist_ok=True)
    config.write_text(_with_workers(model_config_yaml(batch_size=cfg.batch_size), cfg))
    stage_handler_code(export_dir)
    cmd = archiver_command(export_dir, name, store)
    cmd[cmd.index("--config-file") + 1] = str(config)
    _run_archiver(cmd)


def build_baseline(weights: Path, store: Path, name: str, cfg: ServerConfig) -> None:
    """``store/NAME.mar`` of the baseline: the Ultralytics checkpoint and ``bench/baseline_handler.py``."""
    config = store / f"{name}-{MODEL_CONFIG_FILE}"
    store.mkdir(parents=True, exist_ok=True)
    config.write_text(_with_workers("responseTimeout: 120\n", cfg))
    exe = Path(sys.executable).with_name("torch-model-archiver")
    _run_archiver([
        str(exe) if exe.exists() else "torch-model-archiver",
        "--model-name", name, "--version", "1.0",
        "--serialized-file", str(weights),
        "--handler", str(BASELINE_HANDLER),
        "--config-file", str(config),
        "--export-path", str(store), "--force",
    ])


class Client:
    """HTTP client of one server: one keep-alive ``http.client`` connection per thread (or a new
    connection per request).

    ``http.client`` rather than ``requests``: a load generator should cost as little as it can, and on
    the 2-core machine ``requests`` adds 1.2-2.3 ms to every call (``python -m bench.experiments.breakdown``, the
    line under its table), which would be counted as served latency. S and T get the same client."""

    def __init__(self, server: TorchServe, keep_alive: bool = True) -> None:
        self.url = server.predictions_url
        self.headers = {**server.headers(), "Content-Type": "image/jpeg"}
        parts = urlsplit(self.url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path
        self.keep_alive = keep_alive
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None) if self.keep_alive else None
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
            if self.keep_alive:
                self._local.conn = conn
        return conn

    def request(self, data: bytes) -> tuple[float, int, bytes]:
        """One request: (latency ms, status, body)."""
        conn = self._connection()
        t0 = time.perf_counter()
        try:
            conn.request("POST", self.path, body=data, headers=self.headers)
            r = conn.getresponse()
            body = r.read()
        except (http.client.HTTPException, OSError):
            conn.close()
            self._local.conn = None
            raise
        ms = (time.perf_counter() - t0) * 1000
        if not self.keep_alive:
            conn.close()
        return ms, r.status, body

    def post(self, data: bytes) -> float:
        """One request; returns its latency in ms. Raises on a non-200 answer."""
        ms, status, body = self.request(data)
        if status != 200:
            raise RuntimeError(f"{self.url} answered {status}: {body[:300]!r}")
        return ms

    def check(self, data: bytes) -> dict:
        """One request whose answer must be 200 with a JSON body that has ``detections`` (S and T alike)."""
        _, status, text = self.request(data)
        if status != 200:  # (TorchServe sends no Content-Type unless the handler sets one; T does not)
            raise RuntimeError(f"{self.url} answered {status}: {text[:300]!r}")
        body = json.loads(text)
        if "detections" not in body:
            raise RuntimeError(f"{self.url} answered without detections: {text[:300]!r}")
        return body


def run_concurrently(work: list[Callable[[], None]]) -> float:
    """Each of ``work`` in a thread of its own, all started together; returns the wall seconds until the last
    ended. An error in any thread ends that thread and is raised here, after the others ended."""
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported after the threads end
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in work]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} thread(s) failed; first: {errors[0]}") from errors[0]
    return wall


def run_load(client: Client, payloads: list[bytes], n: int, concurrency: int) -> tuple[list[float], float]:
    """``n`` requests from ``concurrency`` threads, cycling ``payloads``; (latencies ms, wall s)."""
    lock = threading.Lock()
    next_i = iter(range(n))
    latencies: list[float] = []

    def worker() -> None:
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            ms = client.post(payloads[i % len(payloads)])
            with lock:
                latencies.append(ms)

    wall = run_concurrently([worker] * concurrency)
    return latencies, wall


def server_pids(server: TorchServe, workers: int, timeout: float = 300.0) -> set[int]:
    """The server's processes (Java frontend and all workers), once ``workers`` workers are READY."""
    deadline = time.monotonic() + timeout
    while True:
        ready = [w for m in server.describe_model() for w in m.get("workers", []) if w.get("status") == "READY"]
        if len(ready) >= workers or time.monotonic() > deadline:
            return server.pids | server.worker_pids()
        time.sleep(0.5)


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU seconds so far of ``pids`` (those that still run)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def worker_rss_mb(server: TorchServe) -> float:
    """Resident memory of all the model's workers together, MiB."""
    total = 0
    for pid in server.worker_pids():
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20
