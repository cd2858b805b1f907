"""Start and stop a real TorchServe: the launcher of ``yolo-ts-serve`` (``tools/serve.py``), the demo,
the tests and the benchmark. Not part of the archive.

Each server gets its own ``TMPDIR`` (TorchServe keeps its PID file there, so two servers never see
each other) and ``TEMP`` (the worker's Unix socket, ``$TEMP/.ts.sock.9000``, would collide otherwise),
both ``WORKDIR/tmp``, its own working directory (``key_file.json``, ``logs/`` with ``launcher.log``) and ports
that are checked to be free before TorchServe starts: a second ``torchserve --start`` on busy ports fails,
but only after it has rewritten ``key_file.json``, which locks clients out of the server that holds the
ports.

The config TorchServe starts with is a file of the launcher's own, ``WORKDIR/tmp/yolo-ts-serve.properties``
(:data:`MERGED_CONFIG`): the given config.properties with this run's ports, model store and overrides. The
given file is only read, so a run's settings (``--enable-rollout``'s model API) never outlive the run and
never change a file the user or git owns.

Readiness comes from the management API: ``GET /models/NAME`` until a worker is ``READY`` (``/ping``
answers before the model has loaded), then ``GET /models/NAME?customized=true``, whose answer carries the
load error of a model that failed to load for good (``handler.service.FailedModel``; its worker is READY
too). :meth:`TorchServe.stop` runs ``torchserve --stop`` with the same ``TMPDIR``, then ends, by PID, only
the processes this server started (the Java frontend and its workers) if any are still alive.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from handler.errors import ModelLoadFailed

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_CONFIG = REPO_ROOT / "config.properties"
PID_FILE = ".model_server.pid"  # in TMPDIR, written by the torchserve launcher
# Set (to the reason) where no TorchServe may start: tests/conftest.py sets it for the fast tier's tests, so that
# one that starts a server, in process or in a command it runs, fails at once instead of slowing the tier down.
NO_SERVER_ENV = "YOLO_TS_NO_SERVER"
KEY_FILE = "key_file.json"  # in the server's working directory
MERGED_CONFIG = Path("tmp") / "yolo-ts-serve.properties"  # in the working directory: the config TorchServe starts with
LAUNCHER_LOG = Path("logs") / "launcher.log"  # in the working directory: the torchserve launcher's own output

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


class ModelCannotLoad(ServerError):
    """The worker is up, but its model failed to load for good; the message is the worker's own answer."""


PORT_KEYS = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
_ADDRESS_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}
_DEFAULT_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082, "grpc_inference": 7070, "grpc_management": 7071}


def read_properties(text: str) -> dict[str, str]:
    """``key=value`` lines of a config.properties (comments and blank lines skipped)."""
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def configured_ports(text: str) -> dict[str, tuple[str, int]]:
    """The ``(host, port)`` each TorchServe API of this config.properties binds (TorchServe's defaults
    where a key is missing)."""
    props = read_properties(text)
    out = {}
    for name, key in _ADDRESS_KEYS.items():
        address = props.get(key, f"http://127.0.0.1:{_DEFAULT_PORTS[name]}")
        host_port = address.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.rpartition(":")
        out[name] = (host or "127.0.0.1", int(port))
    for name in ("grpc_inference", "grpc_management"):
        out[name] = (props.get(f"{name}_address", "127.0.0.1"), int(props.get(f"{name}_port", _DEFAULT_PORTS[name])))
    return out


def busy_ports(ports: dict[str, tuple[str, int]]) -> list[str]:
    """The APIs whose address cannot be bound now, as ``"inference 127.0.0.1:8080"``."""
    busy = []
    for name, (host, port) in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                busy.append(f"{name} {host}:{port}")
    return busy


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
    return server_properties_text(base.read_text(), {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "model_store": str(model_store),
        "load_models": load_models,
    })


def server_properties_text(text: str, replace: dict[str, str]) -> str:
    """config.properties ``text`` with the values of ``replace`` set (kept in place, or appended)."""
    replace = dict(replace)
    lines = []
    for line in text.splitlines():
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
    log_start: int = 0  # bytes of logs/model_log.log written before this server started (a reused workdir)
    token_auth = True  # class attribute: False for a config with disable_token_authorization=true (the KServe layout)

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
        return {"Authorization": f"Bearer {self.key(api)}"} if self.token_auth else {}

    def __enter__(self) -> "TorchServe":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()  # ``with start_server(...) as server:`` stops it on exit, also when the body fails

    def model_log(self) -> str:
        """The workers' log (``logs/model_log.log``): everything the handler logs."""
        path = self.workdir / "logs" / "model_log.log"
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(self.log_start if path.stat().st_size >= self.log_start else 0)  # rotated: read it whole
            return f.read().decode(errors="replace")

    @property
    def config_file(self) -> Path:
        """The config.properties TorchServe was started with (the launcher's merged copy)."""
        return self.workdir / MERGED_CONFIG

    @property
    def launcher_log(self) -> Path:
        return self.workdir / LAUNCHER_LOG

    def describe_model(self) -> list[dict]:
        r = requests.get(f"{self.management_url}/models/{self.model}", headers=self.headers("management"), timeout=10)
        r.raise_for_status()
        return r.json()

    def load_failure(self, timeout: float = 60.0) -> str | None:
        """The load error the model's worker answers with (``GET /models/NAME?customized=true``), None when the
        model loaded."""
        r = requests.get(f"{self.management_url}/models/{self.model}", params={"customized": "true"},
                         headers=self.headers("management"), timeout=timeout)
        try:
            return ModelLoadFailed.message_in(r.json()[0].get("customizedMetadata"))
        except (ValueError, LookupError, AttributeError, TypeError):
            return None

    def check_loaded(self) -> None:
        """Raise :class:`ModelCannotLoad` when the READY worker serves a model that failed to load."""
        failure = self.load_failure()
        if failure is not None:
            raise ModelCannotLoad(failure)

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
                raise ServerError(f"TorchServe exited during startup; see {self.workdir}/logs (launcher.log)")
            crashes = self.model_log().count("Backend worker process died")
            if crashes >= 2:  # TorchServe retries forever; a handler that cannot load will not get better
                log = self.model_log()
                raise ServerError(f"the worker died {crashes} times while loading; worker log:\n{log[log.rfind('Traceback'):][-4000:]}")
            if not self.token_auth or self.key_file.exists():  # with tokens, the management API needs the key file
                try:
                    workers = [w for m in self.describe_model() for w in m.get("workers", [])]
                    if any(w.get("status") == "READY" for w in workers):
                        self._remember_processes()
                        self.check_loaded()
                        return
                    last = f"workers {[w.get('status') for w in workers]}"
                except (requests.RequestException, ValueError, KeyError) as e:
                    last = str(e)
            time.sleep(0.5)
        raise ServerError(f"model {self.model!r} not READY after {timeout:.0f} s ({last}); see {self.workdir}/logs")

    def stop(self, timeout: float = 30.0) -> None:
        """``torchserve --stop`` (same TMPDIR and cwd), then end survivors among our own PIDs."""
        self._remember_processes()
        self.launcher_log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.launcher_log, "ab") as log:
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


def rollout_overrides(model_store: Path) -> dict[str, str]:
    """The narrowest config that lets ``tools.rollout`` work: the model API on (it registers, sets the
    default and unregisters versions), and model URLs restricted to archives directly inside the local
    model store, so that nothing can be fetched from a URL (ShellTorch, CVE-2023-43654). Token auth and the
    loopback management address stay as the shipped config has them."""
    pattern = f"file://{re.escape(str(Path(model_store).resolve()))}/[^/]+\\.mar"
    return {"enable_model_api": "true", "allowed_urls": pattern.replace("\\", "\\\\")}  # .properties unescapes backslashes


def server_env(workdir: Path, tmpdir: Path) -> dict[str, str]:
    """The environment of a TorchServe of ``workdir``: its own TMPDIR (PID file) and TEMP (worker socket)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TS_CONFIG_FILE", "PYTHONPATH")}
    env.update(TMPDIR=str(tmpdir), TEMP=str(tmpdir), LOG_LOCATION=str(workdir / "logs"), METRICS_LOCATION=str(workdir / "logs"))
    return env


def attach(workdir: Path, model: str = "yolo") -> TorchServe:
    """The TorchServe started earlier from ``workdir`` (by :func:`start_server`), to stop or query it."""
    workdir = Path(workdir).resolve()
    props = workdir / MERGED_CONFIG
    if not props.is_file():
        raise ServerError(f"{props} not found: no server was started from {workdir} with yolo-ts-serve")
    ports = {name: port for name, (_, port) in configured_ports(props.read_text()).items()}
    tmpdir = workdir / "tmp"
    return TorchServe(workdir, tmpdir, model, ports, server_env(workdir, tmpdir))


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
    keep_ports: bool = False,
    overrides: dict[str, str] | None = None,
    cpus: set[int] | None = None,
    env: dict[str, str] | None = None,
) -> TorchServe:
    """Start TorchServe serving ``model_store/MODEL.mar`` as ``MODEL`` and wait until it is READY.

    ``keep_ports=False`` (tests, demo, benchmark) serves on free loopback ports; ``keep_ports=True``
    (``yolo-ts-serve``) keeps the addresses of ``config`` (and its ``model_store`` when ``model_store``
    is None). Either way the ports are checked first, and :class:`ServerError` says which are busy.
    ``overrides`` sets config.properties keys on top (e.g. :func:`rollout_overrides`). ``cpus`` pins the
    server (frontend and workers inherit it) to those CPUs, as ``taskset`` or a cpuset would. ``env`` adds
    environment variables to the server's (the workers inherit them).

    ``block_ultralytics=True`` puts a ``sitecustomize.py`` on the server's ``PYTHONPATH`` that makes
    any ``import ultralytics`` raise ImportError, in the frontend's Python launcher and in the workers.
    """
    if os.environ.get(NO_SERVER_ENV):
        raise ServerError(f"TorchServe may not start here: {os.environ[NO_SERVER_ENV]}")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    props = workdir / MERGED_CONFIG
    if Path(config).resolve() == props:
        raise ServerError(f"{config} is where the launcher writes the config it starts TorchServe with; give another --ts-config")
    if keep_ports:  # the config's own addresses (yolo-ts-serve)
        text = Path(config).read_text()
        if model_store is not None:
            text = server_properties_text(text, {"model_store": str(Path(model_store).resolve()), "load_models": f"{model}.mar"})
        ports = {name: port for name, (_, port) in configured_ports(text).items()}
    else:  # free loopback ports (tests, demo, benchmark)
        ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))
        text = server_properties(Path(config), ports, Path(model_store).resolve(), f"{model}.mar")
    if overrides:
        text = server_properties_text(text, overrides)
    busy = busy_ports(configured_ports(text))
    if busy:  # before TorchServe starts: a failed `torchserve --start` still rewrites key_file.json
        raise ServerError(
            f"port(s) already in use: {', '.join(busy)}; another TorchServe (or another program) holds them. "
            "Not starting, so that the running server's key_file.json stays valid. Stop that server "
            "(`yolo-ts-serve --stop --workdir DIR`, or `torchserve --stop` with its TMPDIR), or choose other ports in the config"
        )
    tmpdir = workdir / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    props.write_text(text)
    env = {**server_env(workdir, tmpdir), **(env or {})}
    if block_ultralytics:
        blocker = workdir / "no_ultralytics"
        blocker.mkdir(exist_ok=True)
        (blocker / "sitecustomize.py").write_text(_ULTRALYTICS_BLOCKER)
        env["PYTHONPATH"] = str(blocker)
    model_log = workdir / "logs" / "model_log.log"
    server = TorchServe(workdir, tmpdir, model, ports, env, log_start=model_log.stat().st_size if model_log.exists() else 0)
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    return launch(server, [_torchserve(), "--start", "--ncs", "--ts-config", str(props)], timeout, pin)


def launch(server: TorchServe, cmd: list[str], timeout: float, preexec_fn=None) -> TorchServe:
    """Run the ``torchserve --start`` launcher ``cmd`` in ``server``'s directory and environment, then wait until
    its model is READY; on any failure (the wait included) the server is stopped and the error raised."""
    server.launcher_log.parent.mkdir(parents=True, exist_ok=True)
    with open(server.launcher_log, "ab") as log:  # a file, not a pipe: a full pipe can hang the launcher
        launcher = subprocess.Popen(cmd, cwd=server.workdir, env=server.env, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=preexec_fn)
    try:
        launcher.wait(timeout=60)  # the launcher starts Java, writes the PID file and exits
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        if launcher.poll() is None:
            launcher.kill()
        raise
    return server


def running_server(model_store: Path, workdir: Path, **kwargs) -> TorchServe:
    """``with running_server(...) as server:`` — always stopped on exit, also when the body fails."""
    return start_server(model_store, workdir, **kwargs)


def prometheus_metric_names(text: str) -> set[str]:
    """Metric names in a Prometheus text exposition."""
    return {m.group(1) for m in re.finditer(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{| )", text, re.M)}
