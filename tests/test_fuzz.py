"""Property-based fuzzing (hypothesis) of the request path: parse -> decode -> letterbox.

Whatever a client sends, the handler's per-request path either prepares an image for the batch or
raises a :class:`RequestError` with a 4xx status. Anything else (another exception, a 5xx) would be
logged as our bug and answered 500, so the properties below fail on it. A few thousand examples run
in CI; the database is off so nothing is written to the repository.
"""

from __future__ import annotations

import io
import string

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handler.errors import RequestError
from handler.tasks import task_for
from handler.tasks.detect import Thresholds
from handler.request import IMAGE_FIELDS, ROUTING_KEYS, parse_request
from handler.tasks import TASK_PARAMETERS
from serving_support import make_context

pytestmark = pytest.mark.slow  # thousands of hypothesis examples

NAMES = ["person", "bicycle", "car"]
MAX_PIXELS = 1_000_000  # the fuzzed handler's limit: keeps decodes of mutated headers small and fast
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------- request rows

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
param_text = st.one_of(
    st.text(alphabet=string.printable, max_size=12),
    st.sampled_from(["0.5", "-1", "2", "nan", "inf", "-0", "1e-300", "1e3", "0x10", "person", "car,0", ",", "0,,1", " 2 ", "10000", "10001"]),
    st.integers(-(10**12), 10**12).map(str),
    st.floats().map(repr),
)
row_values = st.one_of(
    st.binary(max_size=64).map(bytearray),
    param_text.map(lambda s: bytearray(s.encode())),
    st.text(max_size=20),
    json_values,
    st.dictionaries(st.sampled_from(["image", *TASK_PARAMETERS, "other"]), json_values | st.binary(max_size=16).map(lambda b: b.hex()), max_size=5),
)
row_keys = st.sampled_from(["body", *IMAGE_FIELDS, *TASK_PARAMETERS, *ROUTING_KEYS]) | st.text(max_size=10)
rows = st.dictionaries(row_keys, row_values, max_size=6)
content_types = st.sampled_from([None, "application/json", "image/jpeg", "application/octet-stream", "text/plain; charset=utf-8"])


@settings(FUZZ, max_examples=2500)
@given(row=rows, content_type=content_types)
def test_fuzz_parse_request_only_raises_4xx(row, content_type):
    try:
        parsed = parse_request(row, task_for("pose"), Thresholds(), NAMES, content_type)
        image, thresholds = parsed.image, parsed.options
    except RequestError as e:
        assert 400 <= e.status < 500 and e.message
        return
    assert isinstance(image, bytes)
    assert thresholds.validate(len(NAMES)) is thresholds  # everything returned is in range
    assert 0 <= thresholds.conf <= 1 and 0 <= thresholds.iou <= 1 and 1 <= thresholds.max_det <= 10000


# ---------------------------------------------------------------- image bytes


def _seeds() -> list[bytes]:
    """Small valid files of every accepted format, to mutate."""
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    out = [cv2.imencode(ext, rgb)[1].tobytes() for ext in (".jpg", ".png", ".bmp", ".webp")]
    out.append(cv2.imencode(".png", rgb.astype(np.uint16) * 257)[1].tobytes())
    for mode, fmt in (("RGB", "TIFF"), ("L", "JPEG"), ("RGBA", "PNG"), ("CMYK", "JPEG")):
        buf = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buf, fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seeds()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "byte", "cut", "insert", "truncate"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:]
    return bytes(data)


SIGNATURES = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\0\0\0\0WEBP", b"GIF89a"]
image_bytes = st.one_of(
    mutated_images(),
    st.binary(max_size=256),
    st.tuples(st.sampled_from(SIGNATURES), st.binary(max_size=256)).map(lambda t: t[0] + t[1]),
)


@pytest.fixture(scope="module")
def fuzz_handler(pose_export):
    from handler.yolo_handler import YoloHandler

    h = YoloHandler()
    h.initialize(make_context(pose_export.out_dir, {"warmup": 0, "torch_threads": 1, "max_image_pixels": MAX_PIXELS}))
    return h


@settings(FUZZ, max_examples=3000)
@given(data=image_bytes, form=st.sampled_from(["raw", "multipart", "json"]))
def test_fuzz_decode_path_only_raises_4xx(fuzz_handler, data, form):
    """The handler's per-request path (parse, decode, letterbox) on damaged and random image bytes."""
    import base64

    row = {"raw": {"body": bytearray(data)}, "multipart": {"image": bytearray(data)}, "json": {"body": {"image": base64.b64encode(data).decode()}}}[form]
    try:
        item = fuzz_handler.service.prepare(row, "application/json" if form == "json" else "application/octet-stream")
    except RequestError as e:
        assert 400 <= e.status < 500 and e.message
        return
    assert 1 <= item.height * item.width <= MAX_PIXELS
    pixels = item.prepared.pixels
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.shape[0] % fuzz_handler.service.pipeline.stride == 0 and pixels.shape[1] % fuzz_handler.service.pipeline.stride == 0
