"""The TorchServe handler without a server: a real ``ts.context.Context`` and request rows shaped the
way TorchServe 0.12 delivers them (see handler/request.py)."""

from __future__ import annotations

import ast
import base64
import json
import logging

import cv2
import numpy as np
import pytest
from serving_support import assert_same_response, check_schema, make_context, run_batch
from ts.context import RequestProcessor

from handler.config import HandlerConfig
from handler.errors import InvalidImage, InvalidParameter, UnsupportedMediaType
from handler.request import parse_request
from handler.tasks import task_for
from handler.tasks.detect import Thresholds
from tools.server import REPO_ROOT

HANDLER_DIR = REPO_ROOT / "handler"
COCO_NAMES = ["person", "bicycle", "car"]
JPEG = b"\xff\xd8\xff\xe0fake"


# ---------------------------------------------------------------- request parsing (no model)


def parse(row, content_type=None, names=COCO_NAMES):
    """(image bytes, thresholds) of a pose model's request row."""
    parsed = parse_request(row, task_for("pose"), Thresholds(), names, content_type)
    return parsed.image, parsed.options


@pytest.mark.parametrize("key", ["body", "image", "data", "file"])
def test_raw_and_multipart_image_fields(key):
    image, t = parse({key: bytearray(JPEG)})
    assert image == JPEG and t == Thresholds()


def test_params_as_row_keys_with_every_form():
    params = {"conf": bytearray(b"0.5"), "iou": bytearray(b"0.6"), "max_det": bytearray(b"7"), "classes": bytearray(b"car, 0")}
    expected = Thresholds(conf=0.5, iou=0.6, max_det=7, classes=(2, 0))
    assert parse({"body": bytearray(JPEG), **params})[1] == expected
    assert parse({"image": bytearray(JPEG), **params})[1] == expected
    body = {"image": base64.b64encode(JPEG).decode()}
    assert parse({"body": body, **params})[1] == expected


def test_json_body_with_fields_and_data_uri():
    body = {"image": "data:image/jpeg;base64," + base64.b64encode(JPEG).decode(), "conf": 0.1, "max_det": 3, "classes": ["bicycle", 2]}
    image, t = parse({"body": body})
    assert image == JPEG and t == Thresholds(conf=0.1, max_det=3, classes=(1, 2))


def test_routing_key_of_invocations_is_ignored():
    assert parse({"body": bytearray(JPEG), "model_name": bytearray(b"yolo")})[0] == JPEG


@pytest.mark.parametrize(
    "row, error, words",
    [
        ({"body": bytearray(JPEG), "conf": bytearray(b"abc")}, InvalidParameter, "conf must be a number"),
        ({"body": bytearray(JPEG), "conf": bytearray(b"1.5")}, InvalidParameter, "conf must be between 0 and 1"),
        ({"body": bytearray(JPEG), "iou": bytearray(b"-1")}, InvalidParameter, "iou"),
        ({"body": bytearray(JPEG), "max_det": bytearray(b"2.5")}, InvalidParameter, "max_det must be an integer"),
        ({"body": bytearray(JPEG), "max_det": bytearray(b"0")}, InvalidParameter, "max_det must be between"),
        ({"body": bytearray(JPEG), "classes": bytearray(b"zebra")}, InvalidParameter, "'zebra' is not a class"),
        ({"body": bytearray(JPEG), "classes": bytearray(b"7")}, InvalidParameter, "out of range"),
        ({"body": bytearray(JPEG), "foo": bytearray(b"1")}, InvalidParameter, "unknown parameter"),
        ({"image": bytearray(JPEG), "file": bytearray(JPEG)}, InvalidParameter, "more than one image"),
        ({"body": {"image": "***"}}, InvalidImage, "not valid base64"),
        ({"body": {"conf": 0.5}}, InvalidImage, 'no "image" field'),
        ({"body": {"image": "", "extra": 1}}, InvalidParameter, "unknown JSON field"),
        ({"body": {"image": base64.b64encode(JPEG).decode(), "conf": 0.2}, "conf": bytearray(b"0.3")}, InvalidParameter, "both"),
        ({"body": {"image": base64.b64encode(JPEG).decode(), "conf": True}}, InvalidParameter, "conf must be a number"),
        ({"body": "some text"}, UnsupportedMediaType, "arrived as text"),
        ({"\xff\xd8 urlencoded bytes": bytearray(b"")}, UnsupportedMediaType, "Content-Type image/*"),
        ({"conf": bytearray(b"0.5")}, InvalidImage, "no image"),
    ],
)
def test_bad_requests_raise_request_errors(row, error, words):
    with pytest.raises(error, match=None) as e:
        parse(row)
    assert words in e.value.message


def test_unparseable_json_is_400_not_415():
    with pytest.raises(InvalidParameter, match="JSON body could not be parsed"):
        parse({"body": bytearray(b"{not json")}, content_type="application/json")


def test_error_statuses_and_body():
    assert (InvalidParameter("x").status, InvalidImage("x").status, UnsupportedMediaType("x").status) == (400, 400, 415)
    assert InvalidImage("bad").body() == {"error": {"type": "invalid_image", "message": "bad"}}
    from handler.errors import ImageTooLarge

    assert ImageTooLarge("x").status == 413 and ImageTooLarge("x").phrase == "Request Entity Too Large"


# ---------------------------------------------------------------- configuration


def test_config_defaults_and_values():
    assert HandlerConfig.from_dict(None) == HandlerConfig()
    c = HandlerConfig.from_dict({"conf": 0.4, "imgsz": 320, "letterbox": "square", "half": True, "torch_threads": 2})
    assert (c.conf, c.imgsz, c.letterbox, c.half, c.torch_threads) == (0.4, (320, 320), "square", True, 2)
    assert HandlerConfig.from_dict({"imgsz": [480, 640]}).imgsz == (480, 640)
    with pytest.raises(Exception):
        c.conf = 0.1  # frozen


@pytest.mark.parametrize(
    "section, words",
    [
        ({"confidence": 0.3}, "unknown key(s) ['confidence']"),
        ({"conf": "high"}, "handler.conf must be a number from 0.0 to 1.0, got 'high'; write e.g. `conf: 0.25`"),
        ({"iou": 2}, "handler.iou"),
        ({"max_det": 0}, "handler.max_det"),
        ({"letterbox": "pad"}, "write e.g. `letterbox: rect`"),
        ({"imgsz": [640]}, "write e.g. `imgsz: 640`"),
        ({"half": "yes"}, "handler.half must be true or false"),
        ({"warmup": -1}, "handler.warmup"),
        ({"max_image_pixels": 1.5}, "handler.max_image_pixels"),
        ({"torch_threads": True}, "handler.torch_threads"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(section, words):
    with pytest.raises(ValueError) as e:
        HandlerConfig.from_dict(section)
    assert words in str(e.value)


def test_config_imgsz_must_be_a_stride_multiple():
    with pytest.raises(ValueError, match=r"write `imgsz: \[640, 352\]`"):
        HandlerConfig.from_dict({"imgsz": [630, 330]}).check_imgsz(32)


def test_handler_package_imports_neither_ultralytics_nor_export():
    for path in HANDLER_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in ("ultralytics", "export"), f"{path.name} imports {name}"


# ---------------------------------------------------------------- the handler with a fake context


@pytest.fixture(scope="module")
def pose_handler(pose_export):
    from handler.yolo_handler import YoloHandler

    ctx = make_context(pose_export.out_dir)
    h = YoloHandler()
    h.initialize(ctx)
    return h, ctx


@pytest.fixture(scope="module")
def detect_export(tmp_path_factory):
    """A detect model: yolo11n.yaml with seeded random weights (no detect checkpoint ships offline)."""
    from export.exporter import export_model

    return export_model("yolo11n.yaml", tmp_path_factory.mktemp("detect"), [320, 320], check=False, log=lambda _: None)


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def test_pose_response_schema_and_speed(pose_handler, images):
    h, ctx = pose_handler
    (body,), statuses = run_batch(h, ctx, [{"body": bytearray(images["bus.jpg"])}])
    assert statuses == [200]
    check_schema(body, pose=True)
    assert body["model"] == "yolo" and body["task"] == "pose" and body["image"] == {"width": 810, "height": 1080}
    assert len(body["detections"]) >= 4 and {d["class_name"] for d in body["detections"]} == {"person"}
    json.dumps(body)  # serialisable as is
    names = {name for name, _, _ in ctx.metrics.recorded}
    assert {"YoloPreprocessTime", "YoloInferenceTime", "YoloPostprocessTime", "YoloBatchSize"} <= names


def test_bad_items_get_their_own_4xx_and_the_rest_still_run(pose_handler, images):
    h, ctx = pose_handler
    solo, _ = run_batch(h, ctx, [{"body": bytearray(images["zidane.jpg"])}])
    rows = [
        {"body": bytearray(images["zidane.jpg"])},
        {"body": bytearray(images["bus.jpg"][: len(images["bus.jpg"]) // 3])},  # truncated JPEG
        {"body": bytearray(b"GIF89a....")},
        {"body": bytearray(images["zidane.jpg"]), "conf": bytearray(b"nope")},
        {"image": bytearray(images["zidane.jpg"])},
    ]
    out, statuses = run_batch(h, ctx, rows)
    assert len(out) == len(rows)
    assert statuses[0] == 200 and statuses[2:] == [415, 400, 200]
    assert out[2]["error"]["type"] == "unsupported_media_type"
    assert out[3] == {"error": {"type": "invalid_parameter", "message": "conf must be a number, got 'nope'"}}
    # A truncated JPEG may still decode (OpenCV fills the rest) or fail as invalid_image; never a 5xx.
    assert statuses[1] == 200 or (statuses[1] == 400 and out[1]["error"]["type"] == "invalid_image")
    assert_same_response(out[0], solo[0])
    assert_same_response(out[4], solo[0])


def test_an_unexpected_error_fails_only_its_own_request(pose_handler, images, monkeypatch, caplog):
    h, ctx = pose_handler
    original = h.service.pipeline.prepare

    def prepare(image, thresholds):
        if image.shape[1] == 1280:  # zidane
            raise RuntimeError("simulated bug")
        return original(image, thresholds)

    monkeypatch.setattr(h.service.pipeline, "prepare", prepare)
    with caplog.at_level(logging.ERROR, logger="handler.service"):
        out, statuses = run_batch(h, ctx, [{"body": bytearray(images["zidane.jpg"])}, {"body": bytearray(images["bus.jpg"])}])
    assert statuses == [500, 200]
    assert out[0] == {"error": {"type": "internal_error", "message": "unexpected error while reading the request"}}
    assert "simulated bug" in caplog.text and "Traceback" in caplog.text
    check_schema(out[1], pose=True)


def test_too_many_pixels_is_413(pose_export, images):
    from handler.yolo_handler import YoloHandler

    ctx = make_context(pose_export.out_dir, {"warmup": 0, "max_image_pixels": 810 * 1080 - 1})
    h = YoloHandler()
    h.initialize(ctx)
    out, statuses = run_batch(h, ctx, [{"body": bytearray(images["bus.jpg"])}, {"body": bytearray(images["zidane.jpg"])}])
    assert statuses == [413, 413]  # 810x1080 and 1280x720 are both above 810*1080-1
    assert out[0]["error"]["type"] == "image_too_large" and "limit is 874799" in out[0]["error"]["message"]
    small = encode(cv2.resize(cv2.imdecode(np.frombuffer(images["bus.jpg"], np.uint8), cv2.IMREAD_COLOR), (405, 540)))
    _, statuses = run_batch(h, ctx, [{"body": bytearray(small)}])
    assert statuses == [200]


def test_result_does_not_depend_on_the_batch(pose_handler, images):
    """The same image alone, and inside a batch of mixed sizes and thresholds, gives the same answer."""
    h, ctx = pose_handler
    bus = cv2.imdecode(np.frombuffer(images["bus.jpg"], np.uint8), cv2.IMREAD_COLOR)
    gray_small = encode(cv2.cvtColor(cv2.resize(bus, (300, 200)), cv2.COLOR_BGR2GRAY))
    alone = [run_batch(h, ctx, [{"body": bytearray(b)}])[0][0] for b in (images["bus.jpg"], images["zidane.jpg"])]
    rows = [
        {"body": bytearray(images["zidane.jpg"])},
        {"body": bytearray(gray_small), "conf": bytearray(b"0.05")},
        {"body": bytearray(images["bus.jpg"])},
        {"body": bytearray(images["bus.jpg"]), "max_det": bytearray(b"1")},
    ]
    out, statuses = run_batch(h, ctx, rows)
    assert statuses == [200] * 4
    assert_same_response(out[0], alone[1])
    assert_same_response(out[2], alone[0])
    assert len(out[3]["detections"]) == 1
    assert_same_response(out[3], {**alone[0], "detections": alone[0]["detections"][:1]})


def test_keypoints_only_for_pose(detect_export, images):
    from handler.yolo_handler import YoloHandler

    ctx = make_context(detect_export.out_dir, {"warmup": 0, "conf": 0.0, "max_det": 5})
    h = YoloHandler()
    h.initialize(ctx)
    (body,), statuses = run_batch(h, ctx, [{"body": bytearray(images["bus.jpg"])}])
    assert statuses == [200] and body["task"] == "detect"
    assert len(body["detections"]) == 5  # random weights, conf 0: top 5 of all candidates
    check_schema(body, pose=False)
    assert all("keypoints" not in d for d in body["detections"])
    assert body["detections"][0]["class_name"] == h.service.pipeline.names[body["detections"][0]["class_id"]]


def test_half_on_cpu_is_ignored_with_a_warning(pose_export, caplog):
    from handler.yolo_handler import YoloHandler

    h = YoloHandler()
    with caplog.at_level(logging.WARNING, logger="handler.service"):
        h.initialize(make_context(pose_export.out_dir, {"warmup": 0, "half": True}))
    assert h.service.pipeline.half is False
    assert "FP16 is CUDA-only" in caplog.text


def test_bad_config_is_refused_at_initialize(pose_export, images):
    """The worker does not load the model; it answers every request with the setting's error (503)."""
    from handler.yolo_handler import YoloHandler

    ctx = make_context(pose_export.out_dir, {"imgsz": 600})
    h = YoloHandler()
    h.initialize(ctx)
    (body,), statuses = run_batch(h, ctx, [{"body": bytearray(images["bus.jpg"])}])
    assert statuses == [503] and body["error"]["type"] == "model_load_failed", body
    assert "not a multiple of the model's max stride 32" in body["error"]["message"]


# ---------------------------------------------------------------- threads


@pytest.mark.parametrize("yaml,workers", [({"maxWorkers": 1}, 1), ({"maxWorkers": 3}, 3), ({}, 1), ({"minWorkers": 16}, 16), (None, 1)])
def test_auto_threads_share_the_usable_cpus_among_workers(monkeypatch, yaml, workers):
    import torch

    from handler.runtime import cpu_budget, device

    monkeypatch.setattr(cpu_budget, "affinity_cpus", lambda: 8)
    monkeypatch.setattr(cpu_budget, "tightest_quota", lambda *a, **k: None)
    assert device.workers_of(yaml) == workers
    before = torch.get_num_threads()
    try:
        assert device.set_threads(0, torch.device("cpu"), yaml) == max(1, 8 // workers)
        assert device.set_threads(3, torch.device("cpu"), yaml) == 3  # torch_threads set: it wins
        torch.set_num_threads(before)
        assert device.set_threads(0, torch.device("cuda:0"), yaml) == before  # CUDA: torch left alone
    finally:
        torch.set_num_threads(before)


def test_the_handler_module_defines_one_class():
    """TorchServe's loader refuses a handler module that defines more than one class."""
    import inspect

    import handler.yolo_handler as module

    own = [n for n, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    assert own == ["YoloHandler"]


def test_handle_returns_compact_json_text_with_its_content_type(pose_handler, images):
    """The handler encodes each answer itself (TorchServe would json.dumps a dict with indent=2)."""
    h, ctx = pose_handler
    ctx.request_processor = [RequestProcessor({"body": {"content-type": "image/jpeg"}}) for _ in range(2)]
    texts = h.handle([{"body": bytearray(images["bus.jpg"])}, {"body": bytearray(b"not an image")}], ctx)
    assert all(isinstance(t, str) for t in texts)
    assert "\n" not in texts[0] and ", " not in texts[0]  # compact separators (the detections hold no strings with ", ")
    assert [json.loads(t).keys() >= {"error"} for t in texts] == [False, True]
    assert [rp.get_response_headers().get("content-type") for rp in ctx.request_processor] == ["application/json"] * 2
