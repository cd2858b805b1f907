"""A worker whose model cannot load for good answers at once: every request, and the describe request, get a
JSON 503 with the load error and what to do (``handler.service.FailedModel``), instead of a worker that
crash-loops while requests wait unanswered. A CUDA error still fails the load (TorchServe retries it).

First the handler with a fake context, then the same archives through a real TorchServe started with the plain
``torchserve --start`` (slow tier)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from ts.context import RequestProcessor

from handler.contract import BACKBONE_FILE, CONTRACT_VERSION, METADATA_FILE, POSTPROCESS_FILE
from handler.errors import ModelLoadFailed
from handler.service import FailedModel
from handler.yolo_handler import METRIC_LOAD_FAILED, YoloHandler
from serving_support import make_context, run_batch
from tools.server import REPO_ROOT


def _copy_export(export_dir: Path, dst: Path) -> Path:
    shutil.copytree(export_dir, dst, ignore=shutil.ignore_patterns("code", "model-config.yaml"))
    return dst


def _with_embedded_metadata(export_dir: Path, dst: Path, **changes) -> Path:
    """A copy of the export whose two TorchScript files embed metadata with ``changes`` (what another release
    or another exporter would have written), and ``metadata.json`` to match."""
    _copy_export(export_dir, dst)
    meta = None
    for name in (BACKBONE_FILE, POSTPROCESS_FILE):
        extra = {METADATA_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit in torch 2.14
            module = torch.jit.load(str(dst / name), _extra_files=extra)
            meta = {**json.loads(extra[METADATA_FILE]), **changes}
            torch.jit.save(module, str(dst / name), _extra_files={METADATA_FILE: json.dumps(meta)})
    (dst / METADATA_FILE).write_text(json.dumps(meta))
    return dst


def _describe(handler: YoloHandler, ctx) -> tuple[int, dict]:
    ctx.request_processor = [RequestProcessor({"describe": "True"})]
    (text,) = handler.handle([{}], ctx)
    return ctx.request_processor[0].get_response_status_code(), json.loads(text)


# What each broken model must say: (how it is broken, the words of its error).
BROKEN = {
    "setting": "handler.imgsz [600, 600] is not a multiple of the model's max stride 32",
    "tracking": "unknown key(s) ['max_stream']",
    "corrupt": f"{BACKBONE_FILE} cannot be loaded as TorchScript (PytorchStreamReader failed",
    "missing": f"{BACKBONE_FILE} is not in",
    "contract": f"contract version 1, this handler reads {CONTRACT_VERSION}",
    "task": "task 'landmarks' is not served by this handler",
}


def _broken_context(kind: str, export_dir: Path, tmp_path: Path):
    """A fake worker context whose model cannot load, broken the way ``kind`` says."""
    section, model_dir = {"warmup": 0}, tmp_path / kind
    if kind == "setting":
        section["imgsz"] = 600
        _copy_export(export_dir, model_dir)
    elif kind == "tracking":
        _copy_export(export_dir, model_dir)
    elif kind == "corrupt":
        _copy_export(export_dir, model_dir)
        (model_dir / BACKBONE_FILE).write_bytes(b"not a TorchScript file" * 100)
    elif kind == "missing":
        _copy_export(export_dir, model_dir)
        (model_dir / BACKBONE_FILE).unlink()
    elif kind == "contract":
        _with_embedded_metadata(export_dir, model_dir, contract=1)
    elif kind == "task":
        _with_embedded_metadata(export_dir, model_dir, task="landmarks")
    ctx = make_context(model_dir, section)
    if kind == "tracking":
        ctx.model_yaml_config["tracking"] = {"max_stream": 4}
    ctx.model_name, ctx.manifest = "yolo", {"model": {"modelVersion": "2.0"}}
    return ctx


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_model_that_cannot_load_answers_every_request_with_its_error(kind, pose_export, sample_images, tmp_path):
    ctx = _broken_context(kind, pose_export.out_dir, tmp_path)
    h = YoloHandler()
    h.initialize(ctx)  # the worker stays up
    assert isinstance(h.service, FailedModel)
    image = bytearray(sample_images[0].read_bytes())
    bodies, statuses = run_batch(h, ctx, [{"body": image}, {"body": bytearray(b"junk")}, {"body": image, "conf": bytearray(b"2")}])
    assert statuses == [503, 503, 503], statuses
    for body in bodies:
        assert set(body) == {"error"} and body["error"]["type"] == "model_load_failed", body
        message = body["error"]["message"]
        assert message.startswith("yolo 2.0 could not load: ") and BROKEN[kind] in message, message
        assert "yolo-ts-export --archive" in message and "logs/model_log.log" in message, message
    status, described = _describe(h, ctx)
    assert status == 503 and described["error"] == bodies[0]["error"], described
    assert (described["model"], described["model_version"]) == ("yolo", "2.0")
    assert ModelLoadFailed.message_in(described) == bodies[0]["error"]["message"]
    assert (METRIC_LOAD_FAILED, 1, "count") in ctx.metrics.recorded


def test_an_oip_request_gets_the_error_in_the_v2_shape(pose_export, tmp_path):
    ctx = _broken_context("setting", pose_export.out_dir, tmp_path)
    h = YoloHandler()
    h.initialize(ctx)
    v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}]}
    bodies, statuses = run_batch(h, ctx, [{"body": v2}, {"body": {"inputs": "not a list"}}], ["application/json"] * 2)
    assert statuses == [503, 503]
    assert [set(b) for b in bodies] == [{"error"}, {"error"}] and all(isinstance(b["error"], str) for b in bodies), bodies
    assert all(BROKEN["setting"] in b["error"] for b in bodies)


def test_a_model_that_loads_reports_the_gauge_at_zero(pose_export, sample_images):
    ctx = make_context(pose_export.out_dir, {"warmup": 0})
    h = YoloHandler()
    h.initialize(ctx)
    assert (METRIC_LOAD_FAILED, 0, "count") in ctx.metrics.recorded
    status, described = _describe(h, ctx)
    assert status == 200 and ModelLoadFailed.message_in(described) is None and described["task"] == "pose"


@pytest.mark.parametrize("broken", [False, True])
def test_the_gauge_goes_through_torchserves_own_metrics_cache_at_load(pose_export, tmp_path, caplog, broken):
    """At load TorchServe 0.12 sets the metrics cache's request id to one string (``ts/model_loader.py``); the
    gauge must still come out as the ``[METRICS]`` log line the frontend turns into a Prometheus metric."""
    import logging

    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    cache = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    cache.initialize_cache()
    cache.model_name = "yolo"
    cache.set_request_ids("6f1c0f1e-load")  # what ModelLoader.load does before initialize
    ctx = _broken_context("setting", pose_export.out_dir, tmp_path) if broken else make_context(pose_export.out_dir, {"warmup": 0})
    ctx.manifest = {"model": {"modelVersion": "2.0"}}
    ctx.metrics = cache
    with caplog.at_level(logging.INFO):
        YoloHandler().initialize(ctx)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"[METRICS]{METRIC_LOAD_FAILED}")]
    assert len(lines) == 1, caplog.text[-2000:]
    assert lines[0].startswith(f"[METRICS]{METRIC_LOAD_FAILED}.Count:{int(broken)}|#ModelVersion:2.0,ModelName:yolo,Level:Model|"), lines
    assert "could not record metric" not in caplog.text


def test_the_load_error_is_read_from_a_description():
    body = ModelLoadFailed("yolo 2.0 could not load: x").body()
    assert ModelLoadFailed.message_in(body) == "yolo 2.0 could not load: x"
    assert ModelLoadFailed.message_in({"error": {"type": "invalid_image", "message": "m"}}) is None
    assert ModelLoadFailed.message_in({"task": "pose"}) is None and ModelLoadFailed.message_in("text") is None


# ---------------------------------------------------------------- a real TorchServe, started as the design's own commands do

SERVED_BROKEN = {  # model name -> the words its 503 must carry
    "bad_setting": "handler.imgsz [500, 500] is not a multiple of the model's max stride 32",
    "corrupt": f"{BACKBONE_FILE} cannot be loaded as TorchScript",
    "contract": f"contract version 1, this handler reads {CONTRACT_VERSION}",
}
ANSWER_BOUND_S = 5.0  # every request to a model that cannot load is answered within this


@pytest.fixture(scope="module")
def plain_server(pose_export, tmp_path_factory):
    """``torch-model-archiver`` and ``torchserve --start`` as a user runs them, with the shipped config.properties:
    three archives whose model cannot load (a ``handler:`` value ``yolo-ts-export --archive`` refuses, a corrupt
    ``backbone.pt``, files of another contract version) and one that loads (``yolo``)."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    import requests

    from export.archive import archiver_command, model_config_yaml, stage_handler_code
    from handler.contract import MODEL_CONFIG_FILE
    from tools.server import PORT_KEYS, REPO_CONFIG, TorchServe, free_ports, server_env, server_properties

    root = tmp_path_factory.mktemp("load_failure")
    store = root / "store"
    store.mkdir()
    dirs = {
        "yolo": (_copy_export(pose_export.out_dir, root / "good"), {}),
        "bad_setting": (_copy_export(pose_export.out_dir, root / "bad_setting"), {"imgsz": 500}),
        "corrupt": (_copy_export(pose_export.out_dir, root / "corrupt"), {}),
        "contract": (_with_embedded_metadata(pose_export.out_dir, root / "contract", contract=1), {}),
    }
    (dirs["corrupt"][0] / BACKBONE_FILE).write_bytes(b"not a TorchScript file" * 100)
    for name, (export_dir, section) in dirs.items():
        (export_dir / MODEL_CONFIG_FILE).write_text(model_config_yaml({"warmup": 0, "torch_threads": 1, **section}))
        stage_handler_code(export_dir)
        with tempfile.TemporaryDirectory(prefix="archiver_", dir=root) as tmp:
            subprocess.run(archiver_command(export_dir, name, store), check=True, capture_output=True, timeout=300, env={**os.environ, "TMPDIR": tmp})
    workdir, tmpdir = root / "server", root / "server" / "tmp"
    tmpdir.mkdir(parents=True)
    ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))
    props = workdir / "config.properties"
    props.write_text(server_properties(REPO_CONFIG, ports, store, ",".join(f"{m}.mar" for m in dirs)))
    server = TorchServe(workdir, tmpdir, "yolo", ports, server_env(workdir, tmpdir))
    exe = Path(sys.executable).with_name("torchserve")
    with open(workdir / "launcher.log", "ab") as log:
        launcher = subprocess.run([str(exe) if exe.exists() else "torchserve", "--start", "--ncs", "--ts-config", str(props)],
                                  cwd=workdir, env=server.env, stdout=log, stderr=subprocess.STDOUT, timeout=120)
    try:
        assert launcher.returncode == 0
        deadline = time.monotonic() + 240
        waiting = set(dirs)
        while waiting and time.monotonic() < deadline:
            server._remember_processes()
            for name in sorted(waiting):
                try:
                    r = requests.get(f"{server.management_url}/models/{name}", headers=server.headers("management"), timeout=10)
                    if any(w["status"] == "READY" for w in r.json()[0]["workers"]):
                        waiting.discard(name)
                except (requests.RequestException, OSError, ValueError, LookupError):
                    pass
            time.sleep(0.5)
        assert not waiting, f"no READY worker for {waiting}; see {workdir}/logs"
        yield server
    finally:
        server.stop()


def _post(server, name: str, form: str, image: bytes):
    import requests

    url, headers = f"{server.inference_url}/predictions/{name}", server.headers()
    if form == "raw":
        return requests.post(url, data=image, headers={**headers, "Content-Type": "image/jpeg"}, timeout=60)
    if form == "multipart":
        return requests.post(url, files={"image": ("bus.jpg", image)}, data={"conf": "0.5"}, headers=headers, timeout=60)
    import base64

    return requests.post(url, json={"image": base64.b64encode(image).decode()}, headers=headers, timeout=60)


@pytest.mark.slow
@pytest.mark.integration
def test_the_load_failed_gauge_reaches_prometheus(plain_server):
    """The handler records ``YoloModelLoadFailed`` when it loads (1: failed for good, 0: loaded); with
    ``metrics_mode=prometheus`` and ``model_metrics_auto_detect=true`` (the shipped config) it is on ``/metrics``
    before any request (this test runs first on the server)."""
    import re

    import requests

    text = requests.get(f"{plain_server.metrics_url}/metrics", timeout=30).text
    lines = [ln for ln in text.splitlines() if ln.startswith(METRIC_LOAD_FAILED)]
    print("\n".join(lines))
    assert f"# TYPE {METRIC_LOAD_FAILED} gauge" in text
    values = {re.search(r'ModelName="([^"]+)"', ln).group(1): float(ln.rsplit(" ", 1)[1]) for ln in lines}
    assert values == {**{name: 1.0 for name in SERVED_BROKEN}, "yolo": 0.0}, lines
    assert all('ModelVersion="1.0"' in ln for ln in lines), lines


@pytest.mark.slow
@pytest.mark.integration
def test_every_request_is_answered_at_once_with_the_cause(plain_server, sample_images):
    import time
    from concurrent.futures import ThreadPoolExecutor

    image = sample_images[0].read_bytes()
    jobs = [(name, form) for name in SERVED_BROKEN for form in ("raw", "multipart", "json")] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        def send(job):
            t0 = time.monotonic()
            r = _post(plain_server, *job, image)
            return job, r, time.monotonic() - t0

        results = list(pool.map(send, jobs))
    for (name, form), r, seconds in results:
        assert r.status_code == 503 and seconds <= ANSWER_BOUND_S, (name, form, r.status_code, seconds, r.text[:300])
        error = r.json()["error"]
        assert error["type"] == "model_load_failed" and SERVED_BROKEN[name] in error["message"], (name, error)
        assert error["message"].startswith(f"{name} 1.0 could not load: "), error
    print(f"slowest answer {max(s for *_, s in results):.2f} s over {len(results)} requests")
    good = _post(plain_server, "yolo", "raw", image)
    assert good.status_code == 200 and good.json()["detections"], good.text[:300]  # the broken models harm no other


@pytest.mark.slow
@pytest.mark.integration
def test_the_description_and_every_readiness_check_say_so(plain_server):
    """``GET /models/NAME?customized=true`` answers 503 with the same error; TorchServe calls the worker READY, so
    deploy/ready.py, the launcher (``tools/server.py``) and ``tools.rollout`` read the description, not the status."""
    import subprocess
    import sys

    import requests

    from tools.rollout import Management, RolloutError, wait_ready

    s = plain_server
    mgmt = Management(s.management_url, s.key_file)
    ready = REPO_ROOT / "deploy" / "ready.py"
    for name, words in SERVED_BROKEN.items():
        r = requests.get(f"{s.management_url}/models/{name}", params={"customized": "true"}, headers=s.headers("management"), timeout=30)
        assert r.status_code == 503, r.text[:300]
        (described,) = r.json()
        assert [w["status"] for w in described["workers"]] == ["READY"]
        assert words in ModelLoadFailed.message_in(described["customizedMetadata"])
        assert words in mgmt.load_failure(name, "1.0")
        with pytest.raises(RolloutError, match=f"{name} 1.0 cannot serve: {name} 1.0 could not load"):
            wait_ready(mgmt, name, "1.0", timeout=30)
        probe = subprocess.run([sys.executable, str(ready), "--config", str(s.workdir / "config.properties"), "--key-file", str(s.key_file),
                                "--model", name], capture_output=True, text=True, timeout=60)
        assert probe.returncode == 1 and "model failed to load" in probe.stderr and words in probe.stderr, probe.stderr
        s.model = name
        assert words in s.load_failure()
    s.model = "yolo"
    assert s.load_failure() is None
    probe = subprocess.run([sys.executable, str(ready), "--config", str(s.workdir / "config.properties"), "--key-file", str(s.key_file)],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
