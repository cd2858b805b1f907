"""Classify models: the transform, the scripted softmax + top-k, the export checks against
``results.probs`` for yolov8n-cls, yolo11n-cls and yolo26n-cls (YAML builds, seeded), and the handler
with a fake context. The real-TorchServe test is in ``test_serving_classify.py``."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from export.classify import ClassifyPostprocess
from export.verify import CLASSIFY_PROB_TOL, VerificationError, check_classify_decode, check_classify_predict
from handler.errors import InvalidParameter
from handler.image.classify_crop import classify_params, classify_transform
from handler.image.decode import decode_image
from handler.image.letterbox import letterbox
from handler.pipeline import YoloPipeline
from handler.request import parse_request
from handler.tasks import TASKS, task_for
from handler.tasks.classify import TopK
from handler.tasks.detect import Thresholds
from tiers import slow_fixture

CLS_MODELS = ["yolov8n-cls.yaml", "yolo11n-cls.yaml", "yolo26n-cls.yaml"]
JPEG = b"\xff\xd8\xff\xe0fake"


# ---------------------------------------------------------------- the transform (no model)


def _ultralytics_host_transform(image: np.ndarray, imgsz) -> np.ndarray:
    """What ``ClassificationPredictor.pre_transform`` does to a BGR array (the resize + crop half)."""
    import torchvision.transforms as T
    from PIL import Image
    from ultralytics.data.augment import classify_transforms

    return np.array(T.Compose(classify_transforms(imgsz).transforms[:2])(Image.fromarray(image)))


@pytest.mark.parametrize("imgsz", [224, 640, [224, 320], [97, 97]])
@pytest.mark.parametrize("hw", [(1, 1), (7, 300), (301, 299), (224, 224), (225, 640), (1080, 810), (33, 1)])
def test_classify_transform_matches_ultralytics_pixel_for_pixel(imgsz, hw):
    image = np.random.default_rng(hw[0] * 1000 + hw[1]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ours, params = classify_transform(image, imgsz)
    ref = _ultralytics_host_transform(image, imgsz)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, ref), f"max diff {np.abs(ours.astype(int) - ref).max()}"
    th, tw = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    assert (params.input_h, params.input_w) == (th, tw) == ours.shape[:2]


def test_classify_params_resize_the_short_side_and_crop_the_centre():
    p = classify_params((1080, 810), 224)  # portrait: width is the short side
    assert (p.resized_h, p.resized_w) == (int(224 * 1080 / 810), 224) == (298, 224)
    assert (p.crop_top, p.crop_left, p.input_h, p.input_w) == (37, 0, 224, 224)
    p = classify_params((720, 1280), [200, 300])  # non-square imgsz: resized to exactly (h, w), no crop
    assert (p.resized_h, p.resized_w, p.crop_top, p.crop_left) == (200, 300, 0, 0)


def test_each_task_owns_its_transform():
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    pixels, params = task_for("classify").transform([224, 224], 32, None)(image)
    assert pixels.shape == (224, 224, 3) and np.array_equal(pixels, classify_transform(image, 224)[0])
    for name in ("detect", "pose", "segment", "obb"):
        pixels, params = task_for(name).transform([640, 640], 32, "rect")(image)
        expected, lb = letterbox(image, 640, 32, "rect")
        assert np.array_equal(pixels, expected) and params == lb
    with pytest.raises(ValueError, match="letterbox must be one of"):
        task_for("detect").transform([640, 640], 32, None)
    assert sorted(TASKS) == ["classify", "depth", "detect", "obb", "pose", "rtdetr", "segment", "semantic"]


# ---------------------------------------------------------------- the scripted postprocessor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scripted_softmax_topk_matches_a_plain_reference(dtype):
    nc = 7
    post = torch.jit.script(ClassifyPostprocess(nc))
    logits = torch.randn(4, nc, generator=torch.Generator().manual_seed(1)) * 3
    top_k = torch.tensor([1, 3, 7, 50])  # 50 > nc returns all nc
    scores, ids, counts = post([logits.to(dtype)], top_k)
    assert counts.tolist() == [1, 3, 7, 7] and scores.shape == ids.shape == (4, 7)
    assert scores.dtype == torch.float32 and ids.dtype == torch.long
    probs = torch.softmax(logits.to(dtype).float(), 1)
    for b in range(4):
        n = int(counts[b])
        order = sorted(range(nc), key=lambda c: -float(probs[b, c]))[:n]
        assert ids[b, :n].tolist() == order
        assert torch.allclose(scores[b, :n], probs[b, order], atol=1e-6)
        assert (ids[b, n:] == -1).all() and (scores[b, n:] == 0).all()  # padding
    empty = post([torch.zeros(0, nc)], torch.zeros(0, dtype=torch.long))
    assert [t.shape[0] for t in empty] == [0, 0, 0]


# ---------------------------------------------------------------- request parameters (no model)


def test_top_k_in_every_form_and_detection_parameters_refused():
    names = [str(i) for i in range(10)]
    cls, det = task_for("classify"), task_for("detect")

    def parse_request_(row, defaults, names):
        task = cls if isinstance(defaults, TopK) else det
        parsed = parse_request(row, task, defaults, names)
        return parsed.image, parsed.options

    assert parse_request_({"body": bytearray(JPEG)}, TopK(), names)[1] == TopK(5)
    assert parse_request_({"body": bytearray(JPEG), "top_k": bytearray(b"3")}, TopK(), names)[1] == TopK(3)
    body = {"image": base64.b64encode(JPEG).decode(), "top_k": 2}
    assert parse_request_({"body": body}, TopK(), names)[1] == TopK(2)
    for bad, words in [(b"0", "between 1 and"), (b"2.5", "must be an integer"), (b"x", "must be an integer"), (b"1001", "between 1 and 1000")]:
        with pytest.raises(InvalidParameter, match=words):
            parse_request_({"body": bytearray(JPEG), "top_k": bytearray(bad)}, TopK(), names)
    with pytest.raises(InvalidParameter, match=r"\['conf', 'classes'\] filter detections .* parameters are \['top_k', 'full_precision'\]"):
        parse_request_({"body": bytearray(JPEG), "conf": bytearray(b"0.5"), "classes": bytearray(b"1")}, TopK(), names)
    with pytest.raises(InvalidParameter, match=r"\['top_k'\] do not apply to a detect model"):
        parse_request_({"body": bytearray(JPEG), "top_k": bytearray(b"3")}, Thresholds(), names)


# ---------------------------------------------------------------- export + parity with results.probs


@slow_fixture(scope="module", params=CLS_MODELS)
def cls_export(request, tmp_path_factory):
    """Each -cls YAML exported (seed 0) at 224, the size of Ultralytics' -cls checkpoints, with the
    exporter's own checks (trace, transform + softmax, and top-5 against ``results.probs``)."""
    from export.exporter import export_model

    out = tmp_path_factory.mktemp(request.param.split(".")[0])
    return export_model(request.param, out, [224, 224], log=lambda _: None)


def test_export_writes_a_classify_artifact(cls_export):
    meta = json.loads((cls_export.out_dir / "metadata.json").read_text())
    assert meta["task"] == "classify" and meta["letterbox"] is None and meta["imgsz"] == [224, 224]
    assert meta["names"] == cls_export.loaded.names and meta["nc"] == len(meta["names"]) == 1000
    pipeline = YoloPipeline.from_dir(cls_export.out_dir)
    x = torch.rand(3, 3, 160, 288)  # any size: the head pools globally
    (logits,) = pipeline.backbone(x)
    assert logits.shape == (3, 1000)


def test_served_pipeline_matches_results_probs(cls_export, sample_images):
    """The predict parity of docs/tasks.md, measured again here: top-5 order equal and |dp| <= 1e-3 on bus.jpg and zidane.jpg."""
    pipeline = YoloPipeline.from_dir(cls_export.out_dir)
    for path in sample_images:
        assert check_classify_predict(cls_export.loaded, pipeline, path) <= CLASSIFY_PROB_TOL
        assert check_classify_decode(cls_export.loaded, pipeline, path) <= 1e-5


def test_the_checks_fail_on_a_wrong_transform_or_another_model(cls_export, sample_images, monkeypatch):
    from dataclasses import replace

    pipeline = YoloPipeline.from_dir(cls_export.out_dir)
    wrong = YoloPipeline.from_dir(cls_export.out_dir)
    wrong.transform = lambda image: letterbox(image, 224, 32, "square")  # same shape, other pixels
    with pytest.raises(VerificationError, match="pixel values differ"):
        check_classify_decode(cls_export.loaded, wrong, sample_images[0])
    other_seed = replace(cls_export.loaded, seed=cls_export.loaded.seed + 1)  # Ultralytics builds other weights
    with pytest.raises(VerificationError, match="top-5"):
        check_classify_predict(other_seed, pipeline, sample_images[0])


def test_default_imgsz_is_what_predict_uses(tmp_path):
    from export.exporter import export_model

    result = export_model("yolo11n-cls.yaml", tmp_path, None, check=False, log=lambda _: None)
    assert result.metadata["imgsz"] == [640, 640]  # a YAML build has no training size: predict's default 640


# ---------------------------------------------------------------- the handler with a fake context


@pytest.fixture(scope="module")
def cls_handler(tmp_path_factory):
    from serving_support import make_context

    from export.exporter import export_model
    from handler.yolo_handler import YoloHandler

    result = export_model("yolo11n-cls.yaml", tmp_path_factory.mktemp("cls_handler"), [224, 224], check=False, log=lambda _: None)
    ctx = make_context(result.out_dir)
    h = YoloHandler()
    h.initialize(ctx)
    return h, ctx, result


def check_classify_schema(body: dict, k: int, names) -> None:
    assert set(body) == {"model", "model_version", "task", "image", "top", "speed_ms"} and body["task"] == "classify"
    assert set(body["image"]) == {"width", "height"}
    assert set(body["speed_ms"]) == {"preprocess", "inference", "postprocess"}
    assert len(body["top"]) == k
    for entry in body["top"]:
        assert set(entry) == {"class_id", "class_name", "score"} and isinstance(entry["class_id"], int)
        assert entry["class_name"] == names[entry["class_id"]] and 0 <= entry["score"] <= 1
    scores = [e["score"] for e in body["top"]]
    assert scores == sorted(scores, reverse=True)


def test_handler_serves_top_k_with_per_item_errors(cls_handler, sample_images):
    from serving_support import run_batch

    h, ctx, result = cls_handler
    bus, zidane = (p.read_bytes() for p in sample_images)
    rows = [
        {"body": bytearray(bus)},
        {"body": bytearray(zidane), "top_k": bytearray(b"2")},
        {"body": bytearray(bus), "conf": bytearray(b"0.3")},
        {"body": {"image": base64.b64encode(zidane).decode(), "top_k": 0}},
        {"body": bytearray(b"GIF89a....")},
    ]
    out, statuses = run_batch(h, ctx, rows)
    assert statuses == [200, 200, 400, 400, 415]
    check_classify_schema(out[0], 5, h.service.pipeline.names)
    check_classify_schema(out[1], 2, h.service.pipeline.names)
    assert out[0]["image"] == {"width": 810, "height": 1080} and "detections" not in out[0]
    assert out[2]["error"]["type"] == "invalid_parameter" and "do not apply to a classify model" in out[2]["error"]["message"]
    assert out[3]["error"]["type"] == "invalid_parameter" and "top_k" in out[3]["error"]["message"]
    # The served JSON against Ultralytics' own prediction of the same seeded model.
    from export.checkpoint import build_yolo

    yolo = build_yolo(result.loaded.source, result.loaded.path, result.loaded.seed)
    for body, path in ((out[0], sample_images[0]), (out[1], sample_images[1])):
        probs = yolo.predict(str(path), imgsz=224, verbose=False)[0].probs
        k = len(body["top"])
        assert [e["class_id"] for e in body["top"]] == probs.top5[:k]
        assert max(abs(e["score"] - float(probs.data[e["class_id"]])) for e in body["top"]) <= CLASSIFY_PROB_TOL


def test_handler_result_does_not_depend_on_the_batch(cls_handler, sample_images):
    from serving_support import run_batch

    h, ctx, _ = cls_handler
    bus = sample_images[0].read_bytes()
    top_k = bytearray(str(h.service.pipeline.nc).encode())  # every class: compare the whole distribution
    alone, _ = run_batch(h, ctx, [{"body": bytearray(bus), "top_k": top_k}])
    rows = [{"body": bytearray(sample_images[1].read_bytes())}, {"body": bytearray(bus), "top_k": top_k}]
    batched, statuses = run_batch(h, ctx, rows)
    assert statuses == [200, 200]
    a = {e["class_id"]: e["score"] for e in alone[0]["top"]}
    b = {e["class_id"]: e["score"] for e in batched[1]["top"]}
    assert a.keys() == b.keys() and max(abs(a[c] - b[c]) for c in a) <= 2e-4


def test_client_draws_the_top_labels(sample_images):
    from tools.client import draw

    image = decode_image(sample_images[0].read_bytes())
    result = {"top": [{"class_id": 3, "class_name": "minibus", "score": 0.61}, {"class_id": 9, "class_name": "cab", "score": 0.2}]}
    out = draw(image, result)
    assert out.shape == image.shape and not np.array_equal(out, image)
    changed = np.argwhere((out != image).any(2))
    assert changed[:, 0].max() < image.shape[0] // 4 and changed[:, 1].max() < image.shape[1] // 2  # top-left corner


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("half", [False, True])
def test_cuda_classify_matches_results_probs(cls_export, sample_images, half):
    pipeline = YoloPipeline.from_dir(cls_export.out_dir, device="cuda:0", half=half)
    for path in sample_images:
        if not half:
            assert check_classify_predict(cls_export.loaded, pipeline, path) <= CLASSIFY_PROB_TOL
            continue
        # FP16: random-weight probabilities are ~1/nc apart by ~1e-7, so only the values are compared
        top = pipeline.infer([pipeline.prepare(decode_image(path.read_bytes()), TopK(5))])[0][0].top
        from export.checkpoint import build_yolo

        yolo = build_yolo(cls_export.loaded.source, cls_export.loaded.path, cls_export.loaded.seed)
        probs = yolo.predict(str(path), imgsz=pipeline.imgsz, verbose=False, device="cpu")[0].probs.data.cpu()
        assert float((top[:, 1] - probs[top[:, 0].long()]).abs().max()) <= CLASSIFY_PROB_TOL
