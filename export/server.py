"""Start and stop a real TorchServe for the tests and the demo (dev side; not part of the archive).

Each server gets free loopback ports, its own ``TMPDIR`` (TorchServe keeps its PID file there, so
two servers never see each other) and its own working directory (``key_file.json``, ``logs/``,
``launcher.log``). Readiness comes from the management API: ``GET /models/NAME`` until a worker is
``READY`` (``/ping`` answers before the model has loaded). :meth:`TorchServe.stop` runs
``torchserve --stop`` with the same ``TMPDIR``, then ends, by PID, only the processes this server
started (the Java frontend and its workers) if any are still alive.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil
import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_CONFIG = REPO_ROOT / "config.properties"
PID_FILE = ".model_server.pid"  # in TMPDIR, written by the torchserve launcher
KEY_FILE = "key_file.json"  # in the server's working directory

# sitecustomize.py that makes `import ultralytics` fail in every Python process of the server,
# so a test can prove the worker serves from the .mar with torch and OpenCV alone.
_ULTRALYTICS_BLOCKER = '''\
import sys


class _BlockUltralytics:
    """Meta-path finder: any import of ultralytics raises ImportError."""

    def find_spec(self, name, path=None, target=None):
        if name == "ultralytics" or name.startswith("ultralytics."):
            raise ImportError(f"{name} is blocked in this TorchServe (test: the worker must not need it)")
        return None


sys.meta_path.insert(0, _BlockUltralytics())
'''


class ServerError(RuntimeError):
    """TorchServe did not start, or its model did not become READY in time."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open while choosing, so none repeats)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def server_properties(base: Path, ports: dict[str, int], model_store: Path, load_models: str) -> str:
    """``base`` config.properties with the HTTP addresses, gRPC ports, model_store and load_models replaced."""
    replace = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "model_store": str(model_store),
        "load_models": load_models,
    }
    lines = []
    for line in base.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and "=" in line and key in replace:
            line = f"{key}={replace.pop(key)}"
        lines.append(line)
    lines += [f"{k}={v}" for k, v in replace.items()]
    return "\n".join(lines) + "\n"


@dataclass
class TorchServe:
    """A running TorchServe started by :func:`start_server`."""

    workdir: Path
    tmpdir: Path
    model: str
    ports: dict[str, int]
    env: dict[str, str]
    pids: set[int] = field(default_factory=set)  # processes this server started (frontend + workers)

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}"

    @property
    def predictions_url(self) -> str:
        return f"{self.inference_url}/predictions/{self.model}"

    @property
    def key_file(self) -> Path:
        return self.workdir / KEY_FILE

    def key(self, api: str = "inference") -> str:
        """The token for ``inference`` or ``management`` from this server's key_file.json."""
        return json.loads(self.key_file.read_text())[api]["key"]

    def headers(self, api: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(api)}"}

    def model_log(self) -> str:
        """The workers' log (``logs/model_log.log``): everything the handler logs."""
        path = self.workdir / "logs" / "model_log.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def describe_model(self) -> list[dict]:
        r = requests.get(f"{self.management_url}/models/{self.model}", headers=self.headers("management"), timeout=10)
        r.raise_for_status()
        return r.json()

    def worker_pids(self) -> set[int]:
        try:
            return {int(w["pid"]) for m in self.describe_model() for w in m.get("workers", []) if w.get("pid")}
        except (requests.RequestException, ValueError, KeyError):
            return set()

    def _frontend_pid(self) -> int | None:
        path = self.tmpdir / PID_FILE
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _remember_processes(self) -> None:
        frontend = self._frontend_pid()
        if frontend is None:
            return
        self.pids.add(frontend)
        try:
            self.pids.update(p.pid for p in psutil.Process(frontend).children(recursive=True))
        except psutil.Error:
            pass

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll the management API until a worker of the model is READY."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            self._remember_processes()
            frontend = self._frontend_pid()
            if frontend is not None and not psutil.pid_exists(frontend):
                raise ServerError(f"TorchServe exited during startup; see {self.workdir}/logs and launcher.log")
            crashes = self.model_log().count("Backend worker process died")
            if crashes >= 2:  # TorchServe retries forever; a handler that cannot load will not get better
                log = self.model_log()
                raise ServerError(f"the worker died {crashes} times while loading; worker log:\n{log[log.rfind('Traceback'):][-4000:]}")
            if self.key_file.exists():
                try:
                    workers = [w for m in self.describe_model() for w in m.get("workers", [])]
                    if any(w.get("status") == "READY" for w in workers):
                        self._remember_processes()
                        return
                    last = f"workers {[w.get('status') for w in workers]}"
                except (requests.RequestException, ValueError, KeyError) as e:
                    last = str(e)
            time.sleep(0.5)
        raise ServerError(f"model {self.model!r} not READY after {timeout:.0f} s ({last}); see {self.workdir}/logs")

    def stop(self, timeout: float = 30.0) -> None:
        """``torchserve --stop`` (same TMPDIR and cwd), then end survivors among our own PIDs."""
        self._remember_processes()
        with open(self.workdir / "launcher.log", "ab") as log:
            subprocess.run(
                [_torchserve(), "--stop"], cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT, timeout=60
            )
        procs = []
        for pid in sorted(self.pids):
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)


def _torchserve() -> str:
    exe = Path(sys.executable).with_name("torchserve")
    return str(exe) if exe.exists() else "torchserve"


def start_server(
    model_store: Path,
    workdir: Path,
    model: str = "yolo",
    config: Path = REPO_CONFIG,
    block_ultralytics: bool = False,
    timeout: float = 180.0,
) -> TorchServe:
    """Start TorchServe serving ``model_store/MODEL.mar`` as ``MODEL`` and wait until it is READY.

    ``block_ultralytics=True`` puts a ``sitecustomize.py`` on the server's ``PYTHONPATH`` that makes
    any ``import ultralytics`` raise ImportError, in the frontend's Python launcher and in the workers.
    """
    workdir = Path(workdir).resolve()
    tmpdir = workdir / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    names = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
    ports = dict(zip(names, free_ports(len(names))))
    props = workdir / "config.properties"
    props.write_text(server_properties(Path(config), ports, Path(model_store).resolve(), f"{model}.mar"))
    env = {k: v for k, v in os.environ.items() if k not in ("TS_CONFIG_FILE", "PYTHONPATH")}
    env.update(TMPDIR=str(tmpdir), TEMP=str(tmpdir), LOG_LOCATION=str(workdir / "logs"), METRICS_LOCATION=str(workdir / "logs"))
    if block_ultralytics:
        blocker = workdir / "no_ultralytics"
        blocker.mkdir(exist_ok=True)
        (blocker / "sitecustomize.py").write_text(_ULTRALYTICS_BLOCKER)
        env["PYTHONPATH"] = str(blocker)
    server = TorchServe(workdir, tmpdir, model, ports, env)
    with open(workdir / "launcher.log", "ab") as log:  # a file, not a pipe: a full pipe can hang the launcher
        launcher = subprocess.Popen(
            [_torchserve(), "--start", "--ncs", "--ts-config", str(props)],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        launcher.wait(timeout=60)  # the launcher starts Java, writes the PID file and exits
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        if launcher.poll() is None:
            launcher.kill()
        raise
    return server


@contextmanager
def running_server(model_store: Path, workdir: Path, **kwargs) -> Iterator[TorchServe]:
    """``with running_server(...) as server:`` — always stopped on exit, also when the body fails."""
    server = start_server(model_store, workdir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def prometheus_metric_names(text: str) -> set[str]:
    """Metric names in a Prometheus text exposition."""
    return {m.group(1) for m in re.finditer(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{| )", text, re.M)}
