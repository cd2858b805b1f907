"""Hostile and broken inputs through the handler, in process (a real ``ts.context.Context``, no server).

The cases come from ``tools.bad_inputs`` (generated, nothing downloaded). Each bad request shares a
batch with valid ones: it must get its own 4xx and JSON error, and the valid ones must get 200 and the
answer they get alone. Valid images in odd encodings and shapes must give what Ultralytics'
``predict`` gives on the same file. The same cases run against a real TorchServe in
``tests/test_reliability.py``.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from serving_support import assert_same_response, check_schema, make_context, response_rows, run_batch

from export.verify import Tolerance, compare_detections, ultralytics_predict
from handler.tasks.detect import Thresholds
from tools.bad_inputs import BOMB_SIDE, bad_probes, odd_images, odd_sizes, png_bomb


@pytest.fixture(scope="module")
def bus(sample_images) -> bytes:
    return sample_images[0].read_bytes()


@pytest.fixture(scope="module")
def handler(pose_export):
    from handler.yolo_handler import YoloHandler

    ctx = make_context(pose_export.out_dir, {"warmup": 0, "torch_threads": 1})
    h = YoloHandler()
    h.initialize(ctx)
    return h, ctx


@pytest.fixture(scope="module")
def small_jpeg(bus) -> bytes:
    """The valid image of the batches: bus.jpg at 240x320, a cheap forward that still finds people."""
    image = cv2.imdecode(np.frombuffer(bus, np.uint8), cv2.IMREAD_COLOR)
    return cv2.imencode(".jpg", cv2.resize(image, (240, 320)))[1].tobytes()


@pytest.fixture(scope="module")
def solo(handler, small_jpeg) -> dict:
    h, ctx = handler
    (body,), statuses = run_batch(h, ctx, [{"body": bytearray(small_jpeg)}])
    assert statuses == [200] and len(body["detections"]) >= 2
    return body


def _probe_ids():
    # Names only (the bodies need bus.jpg); the list is rebuilt inside the test with the real image.
    from export.exporter import sample_images

    return [p.name for p in bad_probes(sample_images()[0].read_bytes())]


@pytest.mark.parametrize("name", _probe_ids())
def test_bad_request_gets_its_4xx_and_its_batch_mates_are_served(handler, bus, small_jpeg, solo, name):
    h, ctx = handler
    probe = next(p for p in bad_probes(bus) if p.name == name)
    row, content_type = probe.row()
    rows = [{"body": bytearray(small_jpeg)}, row, {"image": bytearray(small_jpeg)}]
    out, statuses = run_batch(h, ctx, rows, ["image/jpeg", content_type or "multipart/form-data", "image/jpeg"])
    assert statuses == [200, probe.status, 200], out[1]
    assert set(out[1]) == {"error"} and out[1]["error"]["type"] == probe.error_type
    assert isinstance(out[1]["error"]["message"], str) and len(out[1]["error"]["message"]) > 10
    assert_same_response(out[0], solo)
    assert_same_response(out[2], solo)


def test_gif_rejection_says_why(handler):
    from tools.bad_inputs import animated_gif

    h, ctx = handler
    (body,), statuses = run_batch(h, ctx, [{"body": bytearray(animated_gif())}], ["image/gif"])
    assert statuses == [415] and "GIF" in body["error"]["message"] and "PNG or JPEG" in body["error"]["message"]


def test_bomb_is_413_from_the_header_without_decoding(handler, monkeypatch):
    """60000x60000 declared: 413 before OpenCV decodes a single pixel (no imdecode call at all)."""
    import handler.image.decode as decode

    calls = []

    def no_decode(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the bomb reached the pixel decoder")

    monkeypatch.setattr(decode.cv2, "imdecode", no_decode)
    monkeypatch.setattr(decode.cv2, "imdecodemulti", no_decode)
    h, ctx = handler
    (body,), statuses = run_batch(h, ctx, [{"body": bytearray(png_bomb())}], ["image/png"])
    assert statuses == [413] and body["error"]["type"] == "image_too_large"
    assert calls == []
    assert str(BOMB_SIDE) in body["error"]["message"] or str(BOMB_SIDE * BOMB_SIDE) in body["error"]["message"]


def test_bomb_under_a_raised_pillow_limit_is_still_413(handler, monkeypatch):
    """Our own limit decides, not Pillow's: with Pillow's bomb check out of the way, the header size still gives 413."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    h, ctx = handler
    (body,), statuses = run_batch(h, ctx, [{"body": bytearray(png_bomb())}], ["image/png"])
    assert statuses == [413] and f"{BOMB_SIDE}x{BOMB_SIDE}" in body["error"]["message"]


def _served_rows(handler, data: bytes) -> tuple[dict, np.ndarray]:
    h, ctx = handler
    (body,), statuses = run_batch(h, ctx, [{"body": bytearray(data)}], ["application/octet-stream"])
    assert statuses == [200], body
    check_schema(body, pose=True)
    return body, response_rows(body)


@pytest.mark.parametrize("name", ["16-bit PNG", "RGBA PNG", "grayscale PNG", "grayscale JPEG", "CMYK JPEG", "EXIF-rotated JPEG"])
def test_odd_formats_give_what_ultralytics_gives(handler, pose_export, bus, tmp_path, name):
    images = odd_images(bus)
    path = tmp_path / ("image.png" if "PNG" in name else "image.jpg")
    path.write_bytes(images[name])
    body, ours = _served_rows(handler, images[name])
    ref = ultralytics_predict(pose_export.loaded, path, pose_export.metadata["imgsz"], rect=True)
    assert len(ours) == len(ref) > 0, f"{name}: {len(ours)} served vs {len(ref)} from Ultralytics"
    assert compare_detections(ours, ref, Thresholds().conf, Tolerance()) == []
    if name == "EXIF-rotated JPEG":
        assert body["image"] == {"width": 1080, "height": 810}  # the displayed (rotated) size
    else:
        assert body["image"] == {"width": 810, "height": 1080}
    if name in ("16-bit PNG", "RGBA PNG"):  # the same pixels as the plain PNG after decoding
        plain, _ = _served_rows(handler, images["plain PNG"])
        assert_same_response(body, plain)


@pytest.mark.parametrize("name", ["1x1", "1x10000", "10000x1"])
def test_extreme_shapes_are_served_like_ultralytics(handler, pose_export, tmp_path, name):
    data = odd_sizes()[name]
    path = tmp_path / "image.png"
    path.write_bytes(data)
    body, ours = _served_rows(handler, data)
    w, h = (int(v) for v in name.split("x"))
    assert body["image"] == {"width": w, "height": h}
    ref = ultralytics_predict(pose_export.loaded, path, pose_export.metadata["imgsz"], rect=True)
    assert len(ours) == len(ref)
    assert compare_detections(ours, ref, Thresholds().conf, Tolerance()) == []
