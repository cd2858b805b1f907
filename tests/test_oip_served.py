"""The Open Inference Protocol (KServe v2) against a real TorchServe serving our handler, with a real OIP
client (tritonclient.http), no hand-built v2 JSON for the well-formed requests.

Fixture chain (session): yolo11n-pose.pt -> export (conftest ``pose_export``) -> ``yolo.mar`` (batchSize 4,
the archive's maxBatchDelay, ``export.archive``) -> TorchServe with the repository's config.properties -> READY.
The handler logs ``batch of N request(s): M served`` per batch; the tests read that line from model_log.log.

Note: tritonclient mutates the ``headers`` dict it is given (adds Content-Encoding and
Inference-Header-Content-Length), so every call gets a fresh ``server.headers()``.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import requests

pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a test extra")
from tritonclient.http import InferenceServerClient, InferInput  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from handler import oip  # noqa: E402
from serving_support import assert_same_response, build_test_store, logged_batches  # noqa: E402
from tools.server import running_server  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]

@pytest.fixture(scope="module")
def server(tmp_path_factory, pose_export):
    # A batch waits up to 300 ms to fill (the shipped CPU delay is 2 ms): the concurrent tests' requests then share
    # batches whatever the machine's speed, instead of only when they happen to arrive while a forward runs.
    store = build_test_store(pose_export.out_dir, tmp_path_factory, "oip_model_store", torchserve_settings={"maxBatchDelay": 300})
    with running_server(store, tmp_path_factory.mktemp("oip_torchserve")) as s:
        yield s


@pytest.fixture(scope="module")
def solo(server, images) -> dict[str, dict]:
    """Each image sent alone through /predictions (the plain API), the reference for every v2 answer."""
    out = {}
    for name, data in images.items():
        r = requests.post(server.predictions_url, data=data, headers={**server.headers(), "Content-Type": "image/jpeg"}, timeout=120)
        assert r.status_code == 200, r.text
        out[name] = r.json()
    return out


def client(server, concurrency: int = 1) -> InferenceServerClient:
    return InferenceServerClient(server.inference_url.split("//", 1)[1], concurrency=concurrency, network_timeout=180.0)


def image_input(data: bytes, binary: bool = True) -> InferInput:
    inp = InferInput(oip.INPUT_NAME, [1], "BYTES")
    payload = data if binary else base64.b64encode(data).decode()
    inp.set_data_from_numpy(np.array([payload], dtype=object), binary_data=binary)
    return inp


def answer_of(result) -> dict:
    """Our response JSON inside the v2 response."""
    out = result.as_numpy(oip.OUTPUT_NAME)
    assert out is not None and out.shape == (1,), result.get_response()
    value = out[0]
    return json.loads(value.decode() if isinstance(value, bytes) else value)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_v2_infer_equals_predictions(server, images, solo, binary):
    c = client(server)
    for name, data in images.items():
        result = c.infer("yolo", [image_input(data, binary)], request_id=f"r-{name}", headers=server.headers())
        response = result.get_response()
        assert response["model_name"] == "yolo" and response["id"] == f"r-{name}"
        assert_same_response(answer_of(result), solo[name])


def test_parameters_are_per_request_options(server, images):
    c = client(server)
    data = images["bus.jpg"]
    plain = requests.post(
        server.predictions_url,
        json={"image": base64.b64encode(data).decode(), "conf": 0.6, "max_det": 2},
        headers=server.headers(),
        timeout=120,
    )
    assert plain.status_code == 200, plain.text
    result = c.infer("yolo", [image_input(data)], parameters={"conf": 0.6, "max_det": 2}, headers=server.headers())
    ours = answer_of(result)
    assert len(ours["detections"]) <= 2
    assert_same_response(ours, plain.json())
    with pytest.raises(InferenceServerException) as info:
        c.infer("yolo", [image_input(data)], parameters={"confidence": 0.6}, headers=server.headers())
    assert info.value.status() == "400" and "confidence" in info.value.message()


def test_application_json_and_gzip_bodies(server, images, solo):
    """The KServe wrapper's form (Content-Type: application/json) and tritonclient's gzip request compression."""
    data = images["bus.jpg"]
    body, json_size = InferenceServerClient.generate_request_body([image_input(data, binary=False)], request_id="k1")
    assert json_size is None
    r = requests.post(
        f"{server.inference_url}/v2/models/yolo/infer", data=body,
        headers={**server.headers(), "Content-Type": "application/json"}, timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    result = InferenceServerClient.parse_response_body(r.content)
    assert result.get_response()["id"] == "k1"
    assert_same_response(answer_of(result), solo["bus.jpg"])
    gz = client(server).infer("yolo", [image_input(data)], headers=server.headers(), request_compression_algorithm="gzip")
    assert_same_response(answer_of(gz), solo["bus.jpg"])


def test_concurrent_v2_clients_are_batched_and_unchanged(server, images, solo):
    order = [name for _ in range(8) for name in images]  # 16 requests, two image sizes
    c = client(server, concurrency=len(order))
    log_start = len(server.model_log())
    pending = [
        (name, c.async_infer("yolo", [image_input(images[name], binary=i % 2 == 0)], request_id=str(i), headers=server.headers()))
        for i, name in enumerate(order)
    ]
    for i, (name, request) in enumerate(pending):
        result = request.get_result(timeout=180)
        assert result.get_response()["id"] == str(i)
        assert_same_response(answer_of(result), solo[name])
    sizes = [n for n, _ in logged_batches(server, log_start, len(order))]
    assert sum(sizes) == len(order), sizes
    assert max(sizes) > 1, f"no batch of more than one v2 request observed: {sizes}"
    assert max(sizes) <= 4


def test_bad_image_inside_a_v2_batch_is_a_4xx_for_it_alone(server, images, solo):
    """Batch mates of a bad image are served; the bad one gets its own 4xx in the v2 error shape."""
    bad = b"\xff\xd8 this is not a JPEG" * 10
    c = client(server, concurrency=8)
    for attempt in range(3):  # until the bad request shared a batch with good ones (the 300 ms delay makes it the first)
        log_start = len(server.model_log())
        names = ["bus.jpg", "zidane.jpg"] * 4
        pending = [
            (i, name, c.async_infer("yolo", [image_input(bad if i == 3 else images[name])], headers=server.headers()))
            for i, name in enumerate(names)
        ]
        for i, name, request in pending:
            if i == 3:
                with pytest.raises(InferenceServerException) as info:
                    request.get_result(timeout=180)
                assert 400 <= int(info.value.status()) < 500, info.value  # 415 here: not an image format we decode
                assert "image" in info.value.message().lower(), info.value.message()
            else:
                assert_same_response(answer_of(request.get_result(timeout=180)), solo[name])
        batches = logged_batches(server, log_start, len(names))
        if any(n > 1 and served == n - 1 for n, served in batches):
            break
    else:
        pytest.fail(f"the bad request never shared a batch with good ones in 3 rounds: {batches}")


def _fp32_input() -> InferInput:
    inp = InferInput(oip.INPUT_NAME, [1, 3], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3), np.float32))
    return inp


def _shape_mismatch(data: bytes) -> InferInput:
    inp = image_input(data)
    inp.set_shape([2])
    return inp


def _two_images(data: bytes) -> InferInput:
    inp = InferInput(oip.INPUT_NAME, [2], "BYTES")
    inp.set_data_from_numpy(np.array([data, data], dtype=object))
    return inp


def _not_base64() -> InferInput:
    inp = InferInput(oip.INPUT_NAME, [1], "BYTES")
    inp.set_data_from_numpy(np.array(["this is not base64!"], dtype=object), binary_data=False)
    return inp


def test_malformed_v2_bodies_are_400s_that_name_the_problem(server, images):
    data = images["bus.jpg"]
    pids = server.worker_pids()
    c = client(server)
    cases = [
        ([_fp32_input()], ("FP32", "BYTES")),
        ([_shape_mismatch(data)], ("shape [2]",)),
        ([], ("no inputs",)),
        ([_two_images(data)], ("2 images",)),
        ([_not_base64()], ("base64",)),
        ([image_input(data), image_input(data)], ("2 inputs",)),
    ]
    for inputs, words in cases:
        with pytest.raises(InferenceServerException) as info:
            c.infer("yolo", inputs, headers=server.headers())
        assert info.value.status() == "400", info.value
        for word in words:
            assert word in info.value.message(), info.value.message()
    # the raw answer: Content-Type application/json, body {"error": "<string>"}
    body, size = InferenceServerClient.generate_request_body([_fp32_input()])
    r = requests.post(
        f"{server.inference_url}/v2/models/yolo/infer", data=body,
        headers={**server.headers(), "Inference-Header-Content-Length": str(size)}, timeout=60,
    )
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    # the worker keeps serving
    assert answer_of(c.infer("yolo", [image_input(data)], headers=server.headers()))["detections"]
    assert server.worker_pids() == pids


def test_v2_health_and_model_metadata(server, pose_export):
    """``/v2/health/live|ready`` come from TorchServe (``ts_open_inference_protocol=true``); the v2 model
    metadata is key ``v2`` of the handler's describe answer (TorchServe routes no ``GET /v2/models/NAME``)."""
    c = client(server)
    assert c.is_server_live(headers=server.headers())
    assert c.is_server_ready(headers=server.headers())
    r = requests.get(f"{server.management_url}/models/yolo?customized=true", headers=server.headers("management"), timeout=60)
    assert r.status_code == 200, r.text
    (model,) = r.json()
    described = model["customizedMetadata"]
    if isinstance(described, str):
        described = json.loads(described)
    assert described["v2"] == oip.v2_model_metadata("yolo", model["modelVersion"], pose_export.metadata)
