"""The launcher (``tools/server.py``, ``yolo-ts-serve``): servers side by side, busy ports refused before
TorchServe can rewrite ``key_file.json``, and a worker that cannot load reported instead of hanging.
Each test starts real TorchServes on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests

from export.archive import archiver_command, build_archive, stage_handler_code
from tools.serve import main as serve_main
from tools.serve import worker_error
from tools.server import REPO_ROOT, ServerError, attach, busy_ports, configured_ports, running_server, start_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]



@pytest.fixture(scope="module")
def store(pose_export, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("launcher_store")
    build_archive(pose_export.out_dir, "yolo", store, handler_settings={"warmup": 0, "torch_threads": 1})
    return store


def test_two_servers_side_by_side(store, tmp_path, sample_images):
    """Each has its own TMPDIR and TEMP (the worker socket), so both serve at once. ``env`` reaches the
    workers of its own server only (bench.experiments.breakdown's environment variants)."""
    data = sample_images[0].read_bytes()
    with running_server(store, tmp_path / "a", env={"YOLO_TS_TEST_MARK": "a"}) as a, running_server(store, tmp_path / "b") as b:
        assert a.env["TEMP"] != b.env["TEMP"] and a.env["TMPDIR"] == a.env["TEMP"]
        marks = {name: {psutil.Process(pid).environ().get("YOLO_TS_TEST_MARK") for pid in s.worker_pids()} for name, s in (("a", a), ("b", b))}
        assert marks == {"a": {"a"}, "b": {None}}, marks
        for s in (a, b):
            r = requests.post(s.predictions_url, data=data, headers={**s.headers(), "Content-Type": "image/jpeg"}, timeout=120)
            assert r.status_code == 200 and r.json()["detections"], r.text
        sockets = {p.name for s in (a, b) for p in Path(s.env["TEMP"]).glob(".ts.sock.*")}
        assert sockets, "the worker sockets are in each server's own TEMP"


def test_busy_ports_are_refused_before_key_file_is_touched(store, tmp_path, sample_images):
    with running_server(store, tmp_path / "first") as first:
        keys_before = first.key_file.read_text()
        config = first.config_file  # the running server's own ports
        assert len(busy_ports(configured_ports(config.read_text()))) == 5
        second = tmp_path / "second"
        second.mkdir()
        shutil.copy(first.key_file, second / "key_file.json")  # the case of the report: the same directory's keys
        with pytest.raises(ServerError, match="already in use") as e:
            start_server(store, second, config=config, keep_ports=True, timeout=60)
        assert "inference 127.0.0.1:" in str(e.value) and "key_file.json stays valid" in str(e.value)
        assert (second / "key_file.json").read_text() == keys_before and first.key_file.read_text() == keys_before
        assert not (second / "tmp").exists(), "TorchServe was never started"
        # the running server still accepts its keys
        r = requests.post(first.predictions_url, data=sample_images[0].read_bytes(),
                          headers={**first.headers(), "Content-Type": "image/jpeg"}, timeout=120)
        assert r.status_code == 200, r.text


def _broken_store(export_dir: Path, tmp_path: Path) -> Path:
    """An archive whose worker cannot load (``imgsz: 500`` is no multiple of 32), built with the plain
    archiver command: ``build_archive`` itself refuses it."""
    work = tmp_path / "broken_export"
    shutil.copytree(export_dir, work, ignore=shutil.ignore_patterns("code", "model-config.yaml"))
    (work / "model-config.yaml").write_text("minWorkers: 1\nmaxWorkers: 1\nbatchSize: 1\nhandler:\n  imgsz: 500\n  warmup: 0\n")
    stage_handler_code(work)
    store = tmp_path / "broken_store"
    store.mkdir()
    subprocess.run(archiver_command(work, "yolo", store), check=True, capture_output=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    return store


def test_build_archive_refuses_settings_the_worker_would_refuse(pose_export, tmp_path):
    from export.archive import ArchiveError

    with pytest.raises(ArchiveError, match=r"imgsz \[500, 500\] is not a multiple of the model's max stride 32; write `imgsz: \[512, 512\]`"):
        build_archive(pose_export.out_dir, "yolo", tmp_path, handler_settings={"imgsz": 500})
    assert not (tmp_path / "yolo.mar").exists()


def test_yolo_ts_serve_fails_fast_with_the_workers_error(pose_export, tmp_path, capsys):
    store = _broken_store(pose_export.out_dir, tmp_path)
    workdir = tmp_path / "serve"
    config = tmp_path / "config.properties"
    from tools.server import PORT_KEYS, REPO_CONFIG, free_ports, server_properties

    config.write_text(server_properties(REPO_CONFIG, dict(zip(PORT_KEYS, free_ports(5))), store, "yolo.mar"))
    rc = serve_main(["--model-store", str(store), "--ts-config", str(config), "--workdir", str(workdir), "--timeout", "240"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "yolo 1.0 could not load: ValueError: " in err and "not a multiple of the model's max stride 32" in err, err
    assert "the server was stopped" in err and "Traceback" not in err
    # the server was stopped: its ports are free again
    assert busy_ports(configured_ports(config.read_text())) == []


def test_yolo_ts_serve_starts_reports_and_stops(store, tmp_path, capsys, sample_images):
    from tools.server import PORT_KEYS, REPO_CONFIG, free_ports, server_properties

    config = tmp_path / "config.properties"
    config.write_text(server_properties(REPO_CONFIG, dict(zip(PORT_KEYS, free_ports(5))), store, "yolo.mar"))
    workdir = tmp_path / "serve"
    assert serve_main(["--model-store", str(store), "--ts-config", str(config), "--workdir", str(workdir)]) == 0
    try:
        out = capsys.readouterr().out
        assert "a worker is READY" in out and str(workdir.resolve() / "key_file.json") in out
        server = attach(workdir)
        r = requests.post(server.predictions_url, data=sample_images[1].read_bytes(),
                          headers={**server.headers(), "Content-Type": "image/jpeg"}, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        assert serve_main(["--stop", "--workdir", str(workdir)]) == 0
    assert busy_ports(configured_ports(config.read_text())) == []


def test_worker_error_picks_the_exception_line():
    log = "Traceback (most recent call last):\n  File x\nMODEL_LOG - ValueError: model-config.yaml handler.imgsz [500, 500] is not a multiple\n"
    assert worker_error(log) == "ValueError: model-config.yaml handler.imgsz [500, 500] is not a multiple"


def _git(clone: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=clone, capture_output=True, text=True, check=True, timeout=60).stdout


def _serve(clone: Path, log: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m tools.serve ARGS`` run from ``clone`` with its own code; its output in ``log``."""
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "tools.serve", *args], cwd=clone, stdout=out, stderr=subprocess.STDOUT, timeout=400)
    proc.stdout = log.read_text()
    return proc


def test_runs_in_a_fresh_clone_change_no_file_and_keep_the_model_api_off(store, tmp_path):
    """The defaults of a fresh clone (``./config.properties``, a file git tracks, and ``--workdir .``): a run with
    ``--enable-rollout``, a stop, a plain run. The model API is on in the first run only; git sees no change."""
    from tools.server import PORT_KEYS, free_ports, server_properties_text

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True, timeout=120)
    ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))
    shipped = (clone / "config.properties").read_text()
    (clone / "config.properties").write_text(server_properties_text(shipped, {  # free ports, committed: the clone is clean
        **{f"{api}_address": f"http://127.0.0.1:{ports[api]}" for api in ("inference", "management", "metrics")},
        "grpc_inference_port": str(ports["grpc_inference"]), "grpc_management_port": str(ports["grpc_management"]),
    }))
    _git(clone, "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-q", "-am", "free ports for this test")
    shutil.copy(store / "yolo.mar", clone / "model_store" / "yolo.mar")  # model_store/* is ignored
    tracked = (clone / "config.properties").read_bytes()
    management = f"http://127.0.0.1:{ports['management']}"

    def register_status() -> int:
        key = json.loads((clone / "key_file.json").read_text())["management"]["key"]
        r = requests.post(f"{management}/models", params={"url": "yolo-absent.mar"}, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        return r.status_code

    statuses = {}
    for run, args in (("rollout", ["--enable-rollout"]), ("plain", [])):
        proc = _serve(clone, tmp_path / f"{run}.log", *args)
        try:
            assert proc.returncode == 0, proc.stdout
            merged = clone / "tmp" / "yolo-ts-serve.properties"
            assert f"config:     {merged}" in proc.stdout, proc.stdout
            assert ("enable_model_api=true" in merged.read_text()) == (run == "rollout")
            statuses[run] = register_status()
        finally:
            stop = _serve(clone, tmp_path / f"{run}.stop.log", "--stop")
        assert stop.returncode == 0, stop.stdout
        assert (clone / "config.properties").read_bytes() == tracked
    assert statuses["rollout"] != 405 and statuses["plain"] == 405, statuses  # the model API: on, then off again
    assert _git(clone, "status", "--porcelain") == "", "the runs left files that git sees"
