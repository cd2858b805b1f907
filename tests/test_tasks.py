"""Segment and OBB models from request to JSON: the mask encoding, the request's ``polygons``, the
handler with a real ``ts.context.Context``, and one real TorchServe per task (``integration``).

Models are seeded YAML builds (random weights), so the served answers are compared with
``YOLO.predict`` at a low threshold that still yields detections.
"""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest
import requests
from serving_support import make_context
from ts.context import Context, RequestProcessor

from export import verify
from export.archive import build_archive
from export.exporter import export_model
from handler.encoding.masks import encode_rle, mask_polygon, rle_counts
from handler.errors import InvalidParameter
from handler.image.decode import decode_image
from handler.pipeline import YoloPipeline
from handler.request import parse_request
from handler.response import MAX_RESPONSE_BYTES
from handler.tasks import task_for
from handler.tasks.detect import Thresholds
from tools.client import decode_rle, draw
from tools.server import running_server
from tiers import slow_fixture

mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools (the test extra) proves RLE compatibility")
# pycocotools 2.0 decodes through a numpy-1 __array__ signature; numpy 2 warns on every call
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---------------------------------------------------------------- mask encoding (no model)


def _random_masks(seed: int, count: int = 200) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = [np.zeros((5, 7), np.uint8), np.ones((5, 7), np.uint8), np.ones((1, 1), np.uint8)]
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if rng.random() < 0.5:  # a filled box, as most instance masks
            m[:] = 0
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            m[y : y + int(rng.integers(1, h + 1)), x : x + int(rng.integers(1, w + 1))] = 1
        masks.append(m)
    return masks


@pytest.mark.parametrize("seed", [0, 1])
def test_rle_is_byte_equal_to_pycocotools_and_decodes(seed):
    for m in _random_masks(seed):
        ours = encode_rle(m)
        ref = mask_api.encode(np.asfortranarray(m))
        assert ours == {"size": list(ref["size"]), "counts": ref["counts"].decode("ascii")}
        assert np.array_equal(mask_api.decode({"size": ours["size"], "counts": ours["counts"].encode()}), m)
        assert np.array_equal(decode_rle(ours), m), "the client's decoder reads it back"


def test_rle_of_a_large_mask_is_vectorised():
    m = np.zeros((1080, 1920), np.uint8)
    m[200:900, 300:1500] = np.random.default_rng(0).random((700, 1200)) < 0.99  # ~8400 holes: many runs
    counts = rle_counts(m)
    assert counts.sum() == m.size and len(counts) > 10000
    t0 = time.perf_counter()
    for _ in range(5):
        encode_rle(m)
    per_mask_ms = (time.perf_counter() - t0) / 5 * 1000
    # a per-pixel Python loop takes seconds here; the vectorised encoder a few ms (generous for a shared CPU)
    assert per_mask_ms < 200, per_mask_ms


def test_polygon_outlines_the_largest_region():
    m = np.zeros((40, 60), np.uint8)
    m[5:15, 5:15] = 1
    m[20:35, 20:50] = 1  # the larger region
    poly = np.array(mask_polygon(m))
    assert poly[:, 0].min() == 20 and poly[:, 0].max() == 49 and poly[:, 1].min() == 20 and poly[:, 1].max() == 34
    assert mask_polygon(np.zeros((4, 4), np.uint8)) == []


@pytest.mark.parametrize("value, expected", [(b"true", True), (b"1", True), (b"false", False), (b"0", False)])
def test_polygons_parameter(value, expected):
    parsed = parse_request({"body": bytearray(b"img"), "polygons": bytearray(value)}, task_for("segment"), Thresholds(), ["a"])
    assert parsed.response.polygons is expected and parsed.options == Thresholds()
    parsed = parse_request({"body": {"image": "aW1n", "polygons": expected}}, task_for("segment"), Thresholds(), ["a"])
    assert parsed.response.polygons is expected


@pytest.mark.parametrize("row", [{"body": bytearray(b"img"), "polygons": bytearray(b"yes")}, {"body": {"image": "aW1n", "polygons": 2}}])
def test_bad_polygons_parameter_is_rejected(row):
    with pytest.raises(InvalidParameter, match="polygons must be true or false"):
        parse_request(row, task_for("segment"), Thresholds(), ["a"])


# ---------------------------------------------------------------- exported models


@slow_fixture(scope="module")
def seg_export(tmp_path_factory):
    return export_model("yolov8n-seg.yaml", tmp_path_factory.mktemp("seg"), [640, 640], check=False, log=lambda _: None)


@slow_fixture(scope="module")
def obb_export(tmp_path_factory):
    return export_model("yolo11n-obb.yaml", tmp_path_factory.mktemp("obb"), [640, 640], check=False, log=lambda _: None)


def low_conf(export, image: np.ndarray) -> float:
    """A threshold that lets about 20 boxes of this random-weight model through."""
    pipeline = YoloPipeline.from_dir(export.out_dir)
    x = pipeline.to_input([pipeline.prepare(image).pixels])
    return verify.low_threshold(export.loaded, x, candidates=20)


def handle(export, rows: list[dict]) -> tuple[list[dict], Context]:
    from handler.yolo_handler import YoloHandler

    ctx = make_context(export.out_dir)
    h = YoloHandler()
    h.initialize(ctx)
    ctx.request_processor = [RequestProcessor({}) for _ in rows]
    return [json.loads(text) for text in h.handle(rows, ctx)], ctx  # the handler returns JSON text


def test_segment_handler_masks_are_the_pipelines(seg_export, sample_images):
    data = sample_images[0].read_bytes()
    image = decode_image(data)
    conf = low_conf(seg_export, image)
    rows = [{"body": bytearray(data), "conf": str(conf).encode(), "polygons": bytearray(b"true")}, {"body": bytearray(data), "conf": str(conf).encode()}]
    (with_poly, plain), _ = handle(seg_export, rows)
    pipeline = YoloPipeline.from_dir(seg_export.out_dir)
    out = pipeline.infer([pipeline.prepare(image, Thresholds(conf=conf))])[0][0]
    assert len(with_poly["detections"]) == len(out.rows) > 0
    h, w = image.shape[:2]
    for det, mask in zip(with_poly["detections"], out.masks.numpy()):
        assert set(det) == {"box", "score", "class_id", "class_name", "mask", "polygon"}
        assert det["mask"]["size"] == [h, w]
        assert np.array_equal(mask_api.decode({"size": [h, w], "counts": det["mask"]["counts"].encode()}), mask)
        poly = np.array(det["polygon"])
        assert poly.ndim == 2 and poly.shape[1] == 2 and len(poly) >= 1
        assert mask[int(poly[0, 1]), int(poly[0, 0])] == 1, "the outline runs along mask pixels"
    assert all("polygon" not in d for d in plain["detections"])
    assert [d["mask"] for d in plain["detections"]] == [d["mask"] for d in with_poly["detections"]]
    annotated = draw(image, with_poly)
    assert annotated.shape == image.shape and not np.array_equal(annotated, image)


def test_obb_handler_rows(obb_export, sample_images):
    data = sample_images[1].read_bytes()
    image = decode_image(data)
    (body,), _ = handle(obb_export, [{"body": bytearray(data), "conf": str(low_conf(obb_export, image)).encode()}])
    assert body["task"] == "obb" and len(body["detections"]) > 0
    for det in body["detections"]:
        assert set(det) == {"box", "score", "class_id", "class_name", "obb", "corners"}
        assert set(det["obb"]) == {"cx", "cy", "w", "h", "angle"}
        corners = np.array(det["corners"])
        assert corners.shape == (4, 2)
        assert np.allclose(det["box"], [*corners.min(0), *corners.max(0)], atol=0.011), "box is the corners' hull"
        assert np.allclose(corners.mean(0), [det["obb"]["cx"], det["obb"]["cy"]], atol=0.02)
    annotated = draw(image, body)
    assert not np.array_equal(annotated, image)


# ---------------------------------------------------------------- real TorchServe, one per task


def obb_rows(body: dict) -> np.ndarray:
    """Served OBB detections -> postprocessor rows (export.verify's layout)."""
    rows = []
    for d in body["detections"]:
        o = d["obb"]
        rows.append([*d["box"], d["score"], d["class_id"], o["cx"], o["cy"], o["w"], o["h"], o["angle"], *np.ravel(d["corners"])])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 19)


def invocations(server, data: bytes, **params) -> requests.Response:
    """``POST /invocations?model_name=yolo&...``: the route on which TorchServe passes query parameters."""
    url = f"{server.inference_url}/invocations"
    headers = {**server.headers(), "Content-Type": "application/octet-stream"}
    return requests.post(url, params={"model_name": server.model, **params}, data=data, headers=headers, timeout=300)


@pytest.mark.integration
def test_served_segment_model(seg_export, sample_images, tmp_path_factory):
    store = tmp_path_factory.mktemp("seg_store")
    build_archive(seg_export.out_dir, "yolo", store)
    path = sample_images[0]
    image = decode_image(path.read_bytes())
    conf = low_conf(seg_export, image)
    big = cv2.imencode(".jpg", cv2.resize(image, (1920, 1080)))[1].tobytes()
    with running_server(store, tmp_path_factory.mktemp("seg_ts")) as server:
        r = invocations(server, path.read_bytes(), conf=conf)
        assert r.status_code == 200, r.text
        body = r.json()
        # 50 instances on a 1920x1080 image, with polygons: the size config.properties must allow
        r_big = invocations(server, big, conf=1e-6, max_det=50, polygons="true")
        bad = invocations(server, path.read_bytes(), polygons="maybe")
    assert bad.status_code == 400 and "polygons" in bad.text
    assert r_big.status_code == 200, r_big.text[:300]
    assert len(r_big.json()["detections"]) == 50
    size = len(r_big.content)
    print(f"\n50 segment instances at 1920x1080 with polygons: {size} bytes ({size / 2**20:.2f} MiB)")
    assert size < MAX_RESPONSE_BYTES
    # served vs YOLO.predict at the same threshold: boxes, scores, classes and mask IoU >= 0.95 per match
    ref, ref_masks = verify.ultralytics_predict_with_masks(seg_export.loaded, path, [640, 640], conf=conf)
    ours = np.asarray([[*d["box"], d["score"], d["class_id"]] for d in body["detections"]], np.float64).reshape(-1, 6)
    ours_masks = np.stack([decode_rle(d["mask"]) for d in body["detections"]]) if len(ours) else None
    assert len(ref) > 0
    tol = verify.Tolerance(edge=0.0)
    problems = verify.compare_detections(ours, ref, conf, tol, ours_masks=ours_masks, ref_masks=ref_masks)
    assert problems == [], problems


@pytest.mark.integration
def test_served_obb_model(obb_export, sample_images, tmp_path_factory):
    store = tmp_path_factory.mktemp("obb_store")
    build_archive(obb_export.out_dir, "yolo", store)
    path = sample_images[1]
    conf = low_conf(obb_export, decode_image(path.read_bytes()))
    with running_server(store, tmp_path_factory.mktemp("obb_ts")) as server:
        r = requests.post(server.predictions_url, files={"image": path.read_bytes()}, data={"conf": str(conf)}, headers=server.headers(), timeout=300)
    assert r.status_code == 200, r.text
    ours = obb_rows(r.json())
    ref = verify.ultralytics_predict(obb_export.loaded, path, [640, 640], conf=conf)
    assert len(ref) > 0
    problems = verify.compare_detections(ours, ref, conf, verify.Tolerance(edge=0.0), obb=True)
    assert problems == [], problems
