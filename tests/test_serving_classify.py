"""A classify model through a real TorchServe: yolo11n-cls.yaml (seed 0) -> export -> .mar ->
TorchServe on loopback with ``import ultralytics`` blocked in the worker -> HTTP, compared with
``YOLO(...).predict(...).probs`` of the same seeded model."""

from __future__ import annotations

import requests
import pytest

from export.archive import build_archive
from export.checkpoint import build_yolo
from tools.server import running_server
from export.verify import CLASSIFY_PROB_TOL

pytestmark = pytest.mark.integration

IMGSZ = 224


@pytest.fixture(scope="module")
def cls_model(tmp_path_factory):
    from export.exporter import export_model

    return export_model("yolo11n-cls.yaml", tmp_path_factory.mktemp("cls_export"), [IMGSZ, IMGSZ], check=False, log=lambda _: None)


@pytest.fixture(scope="module")
def cls_server(cls_model, tmp_path_factory):
    store = tmp_path_factory.mktemp("cls_store")
    build_archive(cls_model.out_dir, "yolo", store, handler_settings={"warmup": 1})
    with running_server(store, tmp_path_factory.mktemp("cls_torchserve"), block_ultralytics=True) as server:
        yield server


def test_classify_served_through_torchserve(cls_server, cls_model, sample_images):
    s = cls_server
    h = s.headers()
    yolo = build_yolo(cls_model.loaded.source, cls_model.loaded.path, cls_model.loaded.seed)
    for path in sample_images:
        r = requests.post(s.predictions_url, data=path.read_bytes(), headers={**h, "Content-Type": "image/jpeg"}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"model", "model_version", "task", "image", "top", "speed_ms"} and body["task"] == "classify"
        probs = yolo.predict(str(path), imgsz=IMGSZ, verbose=False)[0].probs
        assert [e["class_id"] for e in body["top"]] == probs.top5
        assert max(abs(e["score"] - float(probs.data[e["class_id"]])) for e in body["top"]) <= CLASSIFY_PROB_TOL
        assert all(e["class_name"] == cls_model.loaded.names[e["class_id"]] for e in body["top"])

    bus = sample_images[0].read_bytes()
    # top_k as a query parameter on /invocations, as a form field and as a JSON field on /predictions
    invocations = f"{s.inference_url}/invocations"
    r = requests.post(invocations, params={"model_name": "yolo", "top_k": "2"}, data=bus, headers={**h, "Content-Type": "image/jpeg"}, timeout=120)
    assert r.status_code == 200 and len(r.json()["top"]) == 2, r.text
    r = requests.post(s.predictions_url, files={"image": bus}, data={"top_k": "7"}, headers=h, timeout=120)
    assert r.status_code == 200 and len(r.json()["top"]) == 7, r.text
    # a detection parameter on a classify model is that request's 400
    r = requests.post(s.predictions_url, files={"image": bus}, data={"conf": "0.5"}, headers=h, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_parameter", r.text
    assert "do not apply to a classify model" in r.json()["error"]["message"]
