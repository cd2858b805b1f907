"""How long a request to a model with no live worker waits, on a real TorchServe.

TorchServe 0.12 queues a request for a model whose worker is down (crash-looping while it loads, or
given up after ``maxRetryTimeoutInSec``) and never answers it: only a worker takes a job off the queue,
and ``responseTimeout``, ``startupTimeout``, ``clientTimeoutInMills`` and ``maxRetryTimeoutInSec`` do
not touch queued jobs (measured in ``docs/torchserve.md``, "How long a request can wait"). So with the
``model-config.yaml`` that ``export/archive.py`` writes, the bound is the client's own timeout, and
``python -m tools.client --timeout S`` must give up after ``S`` seconds with one clear line.
``useJobTicket: true`` (an opt-in: it also refuses every request that finds no idle worker) makes
TorchServe itself answer 503 at once.

The archives' handler is ``tests/wrapped_handlers/failing_load_handler.py``: its model load fails with an I/O
error, a failure that a retry may fix, so the worker dies and TorchServe restarts it. (A model that cannot load
for good, a bad setting or file, gets a worker that answers every request with a 503 at once:
``tests/test_load_failure.py``.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import requests
import yaml

from export.archive import model_config_yaml
from serving_support import wrapped_archive
from tools.server import PORT_KEYS, REPO_CONFIG, REPO_ROOT, TorchServe, free_ports, server_env, server_properties
from wrapped_handlers.failing_load_handler import MESSAGE as LOAD_ERROR

SHIPPED = "yolo"  # the shipped TorchServe keys (export/archive.py), a load that fails on an I/O error
TICKET = "yolo_ticket"  # the same plus the opt-in useJobTicket: true
CLIENT_TIMEOUT_S = 5.0  # the bound with the shipped settings: the client's --timeout
CLIENT_SLACK_S = 2.0  # in-process: the client's own work around the wait
INTERPRETER_SLACK_S = 20.0  # a fresh Python importing cv2/numpy/requests on a loaded 2-core host
TICKET_BOUND_S = 10.0  # useJobTicket: "at once" (measured 0.01-3.5 s on the loaded 2-core host)
NO_HANG_S = 120.0  # a client timeout far above every bound: a hang fails the test instead of passing it

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_shipped_config_has_no_key_that_silences_answers():
    """``clientTimeoutInMills`` drops a late answer without a word (the client waits for ever), and
    ``useJobTicket`` refuses every request that finds no idle worker: neither belongs in the default
    archive. ``responseTimeout`` bounds a batch a worker has taken."""
    config = yaml.safe_load(model_config_yaml())
    assert "clientTimeoutInMills" not in config and "useJobTicket" not in config, config
    assert isinstance(config.get("responseTimeout"), int) and config["responseTimeout"] > 0, config


def _archive(export_dir: Path, store: Path, name: str, torchserve: dict) -> None:
    """``store/NAME.mar`` with the shipped model-config.yaml (plus ``torchserve`` keys) and a load that always fails."""
    wrapped_archive(export_dir, store, "failing_load_handler.py", name=name, torchserve=torchserve, handler_settings={"warmup": 0})


def _worker_deaths(server: TorchServe, model: str) -> int:
    return len(re.findall(rf"W-\d+-{re.escape(model)}_[\d.]+-stdout MODEL_LOG - Backend worker process died", server.model_log()))


def _start_without_waiting(store: Path, workdir: Path, models: list[str], timeout: float = 180.0) -> TorchServe:
    """tools.server.start_server, but return once the frontend has registered ``models`` and each
    worker has died at least once (start_server would wait for READY, which never comes)."""
    workdir.mkdir(parents=True)
    tmpdir = workdir / "tmp"
    tmpdir.mkdir()
    ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))
    props = workdir / "config.properties"
    props.write_text(server_properties(REPO_CONFIG, ports, store, ",".join(f"{m}.mar" for m in models)))
    server = TorchServe(workdir, tmpdir, models[0], ports, server_env(workdir, tmpdir))
    exe = Path(sys.executable).with_name("torchserve")
    with open(workdir / "launcher.log", "ab") as log:
        launcher = subprocess.Popen([str(exe) if exe.exists() else "torchserve", "--start", "--ncs", "--ts-config", str(props)],
                                    cwd=workdir, env=server.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        launcher.wait(timeout=60)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server._remember_processes()
            if server.key_file.exists() and all(_worker_deaths(server, m) for m in models):
                try:
                    if all(_describe(server, m) for m in models):
                        return server
                except requests.RequestException:
                    pass
            time.sleep(0.5)
        raise AssertionError(f"frontend not up or workers not dead after {timeout:.0f} s; see {workdir}/logs")
    except BaseException:
        server.stop()
        if launcher.poll() is None:
            launcher.kill()
        raise


def _describe(server: TorchServe, model: str) -> dict:
    r = requests.get(f"{server.management_url}/models/{model}", headers=server.headers("management"), timeout=10)
    r.raise_for_status()
    return r.json()[0]


@pytest.fixture(scope="module")
def dead_server(tmp_path_factory):
    """One TorchServe serving both broken archives; neither worker ever becomes READY."""
    from export.exporter import export_model

    root = tmp_path_factory.mktemp("wait_bound")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit in torch 2.14
        export_model("yolov8n.yaml", root / "export", [320, 320], check=False, log=lambda _: None)
    store = root / "store"
    store.mkdir()
    _archive(root / "export", store, SHIPPED, {})
    _archive(root / "export", store, TICKET, {"useJobTicket": True})
    server = _start_without_waiting(store, root / "server", [SHIPPED, TICKET])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def image(sample_images) -> bytes:
    return sample_images[0].read_bytes()


def _client_args(server: TorchServe, image_path: Path, model: str, timeout: float) -> list[str]:
    return [str(image_path), "--url", f"{server.inference_url}/predictions/{model}", "--key-file", str(server.key_file),
            "--management-url", server.management_url, "--timeout", f"{timeout:g}"]


def test_no_worker_alive(dead_server):
    """The premise: no worker is READY, and the worker's own error is in its log."""
    for model in (SHIPPED, TICKET):
        assert not [w for w in _describe(dead_server, model)["workers"] if w["status"] == "READY"]
    assert LOAD_ERROR in dead_server.model_log()


def test_torchserve_keeps_a_queued_request_unanswered(dead_server, image):
    """Why the client's timeout is the bound: TorchServe queues the request and does not answer it."""
    before = _describe(dead_server, SHIPPED)["jobQueueStatus"]["pendingRequests"]
    t0 = time.monotonic()
    with pytest.raises(requests.ReadTimeout):
        requests.post(f"{dead_server.inference_url}/predictions/{SHIPPED}", files={"image": ("image", image)},
                      headers=dead_server.headers(), timeout=CLIENT_TIMEOUT_S)
    assert time.monotonic() - t0 >= CLIENT_TIMEOUT_S
    assert _describe(dead_server, SHIPPED)["jobQueueStatus"]["pendingRequests"] == before + 1, "the request stays queued"


def test_client_gives_up_within_its_timeout(dead_server, sample_images, capsys):
    """In process: ``tools.client.main`` returns 1 within --timeout + a little, with one line naming the cause."""
    from tools.client import main

    t0 = time.monotonic()
    code = main(_client_args(dead_server, sample_images[0], SHIPPED, CLIENT_TIMEOUT_S))
    elapsed = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert CLIENT_TIMEOUT_S <= elapsed <= CLIENT_TIMEOUT_S + CLIENT_SLACK_S, elapsed
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no answer from "), err
    assert f"within {CLIENT_TIMEOUT_S:g} s (--timeout)" in lines[0] and "no live worker" in lines[0], err


def test_client_cli_prints_one_line_not_a_traceback(dead_server, sample_images):
    """The user's command (``python -m tools.client ... --timeout 5``): exit 1, one stderr line, nothing on stdout."""
    cmd = [sys.executable, "-m", "tools.client", *_client_args(dead_server, sample_images[0], SHIPPED, CLIENT_TIMEOUT_S)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=NO_HANG_S)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no answer from ") and "--timeout" in lines[0], proc.stderr
    assert CLIENT_TIMEOUT_S <= elapsed <= CLIENT_TIMEOUT_S + INTERPRETER_SLACK_S, elapsed


def test_job_ticket_makes_torchserve_answer_503_at_once(dead_server, image, sample_images):
    """``useJobTicket: true``: no idle worker, so TorchServe refuses the request itself, with a JSON 503."""
    t0 = time.monotonic()
    r = requests.post(f"{dead_server.inference_url}/predictions/{TICKET}", files={"image": ("image", image)},
                      headers=dead_server.headers(), timeout=NO_HANG_S)
    elapsed = time.monotonic() - t0
    assert elapsed <= TICKET_BOUND_S, elapsed
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["code"] == 503 and body["type"] == "ServiceUnavailableException", body
    assert f'Model "{TICKET}" has no worker to serve inference request' in body["message"], body
    assert _describe(dead_server, TICKET)["jobQueueStatus"]["pendingRequests"] == 0, "refused, not queued"
    # the client shows TorchServe's answer and the status, without a traceback
    cmd = [sys.executable, "-m", "tools.client", *_client_args(dead_server, sample_images[0], TICKET, NO_HANG_S)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=NO_HANG_S)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)["code"] == 503 and proc.stderr.strip() == "error: HTTP 503", (proc.stdout, proc.stderr)
