"""A real TorchServe on loopback, real HTTP through ``requests``, no mocks.

Fixture chain (session): yolo11n-pose.pt -> ``python -m export`` files (conftest ``pose_export``) ->
``model_store/yolo.mar`` with the README's torch-model-archiver command (``export.archive``) ->
TorchServe with the repository's config.properties on free loopback ports, its own TMPDIR and
working directory -> READY through the management API -> tests -> stopped in ``finally``.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from export.archive import build_archive
from tools.server import REPO_ROOT, prometheus_metric_names, running_server
from export.verify import Tolerance, compare_detections, ultralytics_predict
from handler.tasks.detect import Thresholds
from serving_support import assert_same_response, check_schema, logged_batches, response_rows

pytestmark = pytest.mark.integration

@pytest.fixture(scope="session")
def model_store(tmp_path_factory, pose_export) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    mar = build_archive(pose_export.out_dir, "yolo", store)
    assert mar == store / "yolo.mar"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
    # The handler/ package must arrive as a package (torch-model-archiver flattens directories).
    expected = {"backbone.pt", "postprocess.pt", "metadata.json", "model-config.yaml", "yolo_handler.py", "MAR-INF/MANIFEST.json"}
    # every module of the handler package, subpackages included, at its own path
    expected |= {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "handler").rglob("*.py")}
    assert expected <= names, expected - names
    assert not any("__pycache__" in n or n.endswith("client.py") for n in names)
    return store


@pytest.fixture(scope="session")
def server(model_store, tmp_path_factory):
    with running_server(model_store, tmp_path_factory.mktemp("torchserve")) as s:
        yield s


def post_raw(server, data: bytes, content_type="image/jpeg", **kw) -> requests.Response:
    return requests.post(server.predictions_url, data=data, headers={**server.headers(), "Content-Type": content_type}, timeout=60, **kw)


def test_ready_worker_and_batching_config(server):
    (model,) = server.describe_model()
    from export.archive import BATCH_DELAY_MS

    assert model["modelName"] == "yolo" and model["batchSize"] == 4 and model["maxBatchDelay"] == BATCH_DELAY_MS["cpu"]
    assert [w["status"] for w in model["workers"]] == ["READY"]
    log = server.model_log()
    loaded = re.search(r"handler package (\S+)", log)
    assert loaded, "the handler did not log its load line"
    # The worker runs the handler/ package shipped in the .mar, not the repository's copy.
    assert Path(loaded.group(1)) != REPO_ROOT / "handler" and loaded.group(1).endswith("handler")


def test_every_input_form_gives_the_same_answer(server, images):
    bus = images["bus.jpg"]
    h = server.headers()
    responses = {
        "image/jpeg": post_raw(server, bus),
        "octet-stream": post_raw(server, bus, "application/octet-stream"),
        "multipart image": requests.post(server.predictions_url, files={"image": bus}, headers=h, timeout=60),
        "multipart data": requests.post(server.predictions_url, files={"data": bus}, headers=h, timeout=60),
        "multipart file": requests.post(server.predictions_url, files={"file": ("bus.jpg", bus, "image/jpeg")}, headers=h, timeout=60),
        "json": requests.post(server.predictions_url, json={"image": base64.b64encode(bus).decode()}, headers=h, timeout=60),
    }
    assert {k: r.status_code for k, r in responses.items()} == {k: 200 for k in responses}
    first = responses["image/jpeg"].json()
    check_schema(first, pose=True)
    assert first["image"] == {"width": 810, "height": 1080} and len(first["detections"]) == 4
    for r in responses.values():
        assert_same_response(r.json(), first)


def test_parameters_in_every_form(server, images):
    bus, h = images["bus.jpg"], server.headers()
    b64 = base64.b64encode(bus).decode()
    invocations = f"{server.inference_url}/invocations"
    full = post_raw(server, bus).json()["detections"]
    high = [d for d in full if d["score"] > 0.8]
    assert 0 < len(high) < len(full)
    answers = [
        # multipart text fields on /predictions
        requests.post(server.predictions_url, files={"image": bus}, data={"conf": "0.8"}, headers=h, timeout=60),
        # JSON fields on /predictions
        requests.post(server.predictions_url, json={"image": b64, "conf": 0.8}, headers=h, timeout=60),
        # query parameters with each form on /invocations (TorchServe 0.12 drops them on /predictions)
        requests.post(invocations, params={"model_name": "yolo", "conf": "0.8"}, data=bus, headers={**h, "Content-Type": "image/jpeg"}, timeout=60),
        requests.post(invocations, params={"model_name": "yolo", "conf": "0.8"}, files={"image": bus}, headers=h, timeout=60),
        requests.post(invocations, params={"model_name": "yolo", "conf": "0.8"}, json={"image": b64}, headers=h, timeout=60),
    ]
    for r in answers:
        assert r.status_code == 200, r.text
        assert [d["score"] for d in r.json()["detections"]] == [d["score"] for d in high]
    r = requests.post(invocations, params={"model_name": "yolo", "max_det": "1", "classes": "person"}, data=bus, headers={**h, "Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200 and len(r.json()["detections"]) == 1
    r = requests.post(server.predictions_url, files={"image": bus}, data={"classes": "0", "iou": "0.3"}, headers=h, timeout=60)
    assert r.status_code == 200 and 0 < len(r.json()["detections"]) <= len(full)
    r = requests.post(invocations, params={"model_name": "yolo", "classes": "zebra"}, data=bus, headers={**h, "Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_parameter"


def test_token_required_and_model_api_off(server, images):
    bus = images["bus.jpg"]
    for headers in ({"Content-Type": "image/jpeg"}, {"Content-Type": "image/jpeg", "Authorization": "Bearer wrong"}):
        r = requests.post(server.predictions_url, data=bus, headers=headers, timeout=60)
        # TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException.
        assert r.status_code in (400, 401, 403) and "Token Authorization failed" in r.text
    assert requests.get(f"{server.management_url}/models/yolo", timeout=10).status_code in (400, 401, 403)
    r = requests.post(f"{server.management_url}/models", params={"url": "yolo.mar"}, headers=server.headers("management"), timeout=10)
    assert r.status_code == 405  # model API off: nothing can be registered over HTTP


def test_bad_input_is_4xx_and_the_server_stays_healthy(server, images):
    pids_before = server.worker_pids()
    h = server.headers()
    huge = cv2.imencode(".png", np.zeros((6000, 7000, 3), np.uint8))[1].tobytes()  # 42 MP > 40 MP
    cases = [
        (post_raw(server, b"this is not an image", "application/octet-stream"), 415, "unsupported_media_type"),
        (post_raw(server, b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "image/png"), 400, "invalid_image"),
        (post_raw(server, huge, "image/png"), 413, "image_too_large"),
        (post_raw(server, b"", "image/jpeg"), 400, "invalid_image"),
        (requests.post(server.predictions_url, json={"image": "@@@"}, headers=h, timeout=60), 400, "invalid_image"),
        (requests.post(server.predictions_url, json={"picture": "x"}, headers=h, timeout=60), 400, "invalid_parameter"),
        (requests.post(server.predictions_url, files={"image": images["bus.jpg"]}, data={"conf": "2"}, headers=h, timeout=60), 400, "invalid_parameter"),
        (requests.post(server.predictions_url, files={"photo": images["bus.jpg"]}, headers=h, timeout=60), 415, "unsupported_media_type"),
        (requests.post(server.predictions_url, data=b"a=1", headers={**h, "Content-Type": "text/plain"}, timeout=60), 415, "unsupported_media_type"),
    ]
    for r, status, kind in cases:
        assert r.status_code == status, r.text
        assert r.json()["error"]["type"] == kind and r.json()["error"]["message"]
    assert requests.get(f"{server.inference_url}/ping", headers=h, timeout=10).json()["status"] == "Healthy"
    assert post_raw(server, images["bus.jpg"]).status_code == 200
    assert server.worker_pids() == pids_before  # no worker crashed and restarted


def test_concurrent_requests_are_batched_and_unchanged(server, images):
    solo = {name: post_raw(server, data).json() for name, data in images.items()}
    log_start = len(server.model_log())
    order = [name for _ in range(8) for name in images]  # 16 requests, two image sizes

    def send(name):
        with requests.Session() as s:
            return name, s.post(server.predictions_url, data=images[name], headers={**server.headers(), "Content-Type": "image/jpeg"}, timeout=120)

    with ThreadPoolExecutor(len(order)) as pool:
        results = list(pool.map(send, order))
    for name, r in results:
        assert r.status_code == 200, r.text
        assert_same_response(r.json(), solo[name])
    sizes = [n for n, _ in logged_batches(server, log_start, len(order))]
    assert sum(sizes) == len(order), sizes
    assert max(sizes) > 1, f"no batch of more than one request observed: {sizes}"
    assert max(sizes) <= 4


def test_served_equals_ultralytics_predict(server, pose_export, sample_images):
    for path in sample_images:
        body = post_raw(server, path.read_bytes()).json()
        ours = response_rows(body)
        ref = ultralytics_predict(pose_export.loaded, path, pose_export.metadata["imgsz"], rect=True)
        assert len(ours) == len(ref) > 0
        problems = compare_detections(ours, ref, Thresholds().conf, Tolerance())
        assert problems == [], f"{path.name}: {problems}"


def test_stage_metrics_in_prometheus(server, images):
    assert post_raw(server, images["bus.jpg"]).status_code == 200
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    names = prometheus_metric_names(text)
    for name in ("YoloPreprocessTime", "YoloInferenceTime", "YoloPostprocessTime", "YoloBatchSize"):
        assert name in names, f"{name} missing from /metrics"
        assert f"# TYPE {name} gauge" in text
        assert re.search(rf'^{name}{{ModelName="yolo",Level="Model",.*}} [0-9.eE+-]+$', text, re.M)


def test_worker_serves_without_ultralytics(model_store, tmp_path_factory, images, server):
    reference = post_raw(server, images["bus.jpg"]).json()
    with running_server(model_store, tmp_path_factory.mktemp("torchserve_no_ultralytics"), block_ultralytics=True) as blocked:
        # The blocker is active in exactly the environment the server (and its workers) run in.
        probe = subprocess.run(
            [sys.executable, "-c", "import ultralytics"], env=blocked.env, capture_output=True, text=True, timeout=60
        )
        assert probe.returncode != 0 and "ultralytics is blocked" in probe.stderr
        ok = subprocess.run([sys.executable, "-c", "import torch, cv2, numpy"], env=blocked.env, timeout=120)
        assert ok.returncode == 0
        r = post_raw(blocked, images["bus.jpg"])
        assert r.status_code == 200, r.text
        assert_same_response(r.json(), reference)
        assert "ultralytics" not in {m.split(".")[0] for m in re.findall(r"No module named '([\w.]+)'", blocked.model_log())}


def test_model_description_names_the_classes_and_parameters(server):
    """``GET /models/yolo?customized=true`` (management API) carries the handler's own description."""
    r = requests.get(f"{server.management_url}/models/yolo", params={"customized": "true"}, headers=server.headers("management"), timeout=30)
    assert r.status_code == 200, r.text
    import json

    custom = r.json()[0]["customizedMetadata"]  # TorchServe parses the handler's JSON text
    custom = json.loads(custom) if isinstance(custom, str) else custom
    assert custom["task"] == "pose" and custom["names"] == ["person"] and custom["kpt_shape"] == [17, 3]
    assert custom["parameters"] == ["conf", "iou", "max_det", "classes", "polygons", "full_precision"] and custom["imgsz"] == [640, 640]

