"""Semantic segmentation, depth and RT-DETR through the three commands: ``python -m export
--archive`` on a checkpoint, a real TorchServe, ``POST /predictions/yolo``, and the served JSON against
Ultralytics' own ``predict`` on the same file. One server per family; Ultralytics is blocked in it.

The checkpoints are seeded YAML builds whose output layers are re-drawn (``test_new_tasks._widen_outputs``),
so that their outputs vary like a trained model's, saved as fp32 ``.pt`` files."""

from __future__ import annotations

import base64
import warnings
from pathlib import Path

import numpy as np
import pytest
import requests
from test_new_tasks import FAMILIES, SEED, _save_fp32, _widen_outputs

from export.verify import Tolerance, compare_detections
from handler.encoding.dense import decode_class_map_png, decode_depth_png16, decode_float32, depth_step
from tools.client import decode_rle
from tiers import slow_fixture

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@slow_fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def served(request, tmp_path_factory, sample_images):
    """(task, checkpoint, running server) for each family, exported and archived by the CLI itself."""
    from export.__main__ import main as export_main
    from export.checkpoint import _resolve_source, build_yolo
    from handler.image.decode import decode_image
    from tools.server import running_server

    task, yaml = request.param, FAMILIES[request.param]
    work = tmp_path_factory.mktemp(f"served_{task}")
    yolo = build_yolo(yaml, _resolve_source(yaml), SEED)
    _widen_outputs(yolo, task, decode_image(sample_images[0].read_bytes()))
    pt = work / f"{Path(yaml).stem}-widened.pt"
    _save_fp32(yolo, pt)
    store = work / "model_store"
    assert export_main(["--weights", str(pt), "--out", str(work / "export"), "--archive", "--model-store", str(store)]) == 0
    with running_server(store, work / "torchserve", block_ultralytics=True) as server:
        yield task, pt, server


def _post(server, data: bytes, **params) -> requests.Response:
    return requests.post(server.predictions_url, files={"image": ("image", data)}, data={k: str(v) for k, v in params.items()},
                         headers=server.headers(), timeout=300)


def _predict(task: str, pt: Path, path: Path, **kwargs):
    from ultralytics import RTDETR, YOLO

    model = (RTDETR if task == "rtdetr" else YOLO)(str(pt))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.predict(str(path), verbose=False, **kwargs)[0]


def _class_map_from_rle(body: dict) -> np.ndarray:
    sem = body["semantic"]
    out = np.full(sem["size"], sem["ignore"], np.int64)
    for c in sem["classes"]:
        out[decode_rle(c["mask"]).astype(bool)] = c["class_id"]
    return out


def test_semantic_matches_predict_in_both_encodings(served, sample_images):
    task, pt, server = served
    if task != "semantic":
        pytest.skip("semantic only")
    for path in sample_images:
        data = path.read_bytes()
        r = _post(server, data)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == "semantic" and set(body["semantic"]) == {"size", "ignore", "classes"}
        ours = _class_map_from_rle(body)
        ref = _predict(task, pt, path).semantic_mask.data.cpu().numpy()
        assert ours.shape == ref.shape
        share = float((ours == ref).mean())
        assert share >= 0.995, f"{path.name}: {share:.4%} of pixels equal"
        assert len(body["semantic"]["classes"]) >= 3, "a widened model predicts several classes"
        assert sum(c["pixels"] for c in body["semantic"]["classes"]) == ours.size
        print(f"\nserved semantic {path.name}: {share:.4%} pixels equal to results.semantic_mask")
        png = _post(server, data, encoding="png").json()["semantic"]
        assert "mask" not in png["classes"][0] and png["bits"] == 8
        assert np.array_equal(decode_class_map_png(base64.b64decode(png["png"])), ours)
        # classes=: every other class is 255, as Ultralytics' classes=
        keep = [c["class_id"] for c in body["semantic"]["classes"][:2]]
        filtered = _class_map_from_rle(_post(server, data, classes=",".join(map(str, keep))).json())
        ref = _predict(task, pt, path, classes=keep).semantic_mask.data.cpu().numpy()
        assert set(np.unique(filtered)) <= set(keep) | {255} and float((filtered == ref).mean()) >= 0.995


def test_depth_matches_predict_in_both_encodings(served, sample_images):
    task, pt, server = served
    if task != "depth":
        pytest.skip("depth only")
    for path in sample_images:
        data = path.read_bytes()
        body = _post(server, data).json()
        d = body["depth"]
        assert set(d) == {"size", "unit", "min", "max", "png16", "stats"} and d["unit"] == "m"
        ref = _predict(task, pt, path).depth.data.cpu().numpy().astype(np.float32)
        assert list(ref.shape) == d["size"]
        png = decode_depth_png16(base64.b64decode(d["png16"]), d["min"], d["max"])
        assert np.abs(png - ref).max() <= depth_step(d["min"], d["max"]) * 1.01, "png16 within one quantisation step"
        raw = _post(server, data, encoding="float32").json()["depth"]
        ours = decode_float32(base64.b64decode(raw["float32"]), *raw["size"])
        rel = np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-6)
        assert float(np.percentile(rel, 99)) <= 1e-3
        assert d["stats"]["min"] == pytest.approx(float(ref.min()), rel=1e-5) and d["stats"]["max"] == pytest.approx(float(ref.max()), rel=1e-5)
        print(f"\nserved depth {path.name}: p99 rel error {np.percentile(rel, 99):.2e}, range {d['min']:.2f}-{d['max']:.2f} m")
    # detection options are a 400 for that request alone; an unknown encoding lists the valid ones
    r = _post(server, sample_images[0].read_bytes(), conf=0.5)
    assert r.status_code == 400 and "do not apply to a depth model" in r.json()["error"]["message"]
    r = _post(server, sample_images[0].read_bytes(), encoding="png")
    assert r.status_code == 400 and "['png16', 'float32']" in r.json()["error"]["message"]


def test_rtdetr_matches_predict(served, sample_images):
    task, pt, server = served
    if task != "rtdetr":
        pytest.skip("RT-DETR only")
    for path in sample_images:
        # The widened random scores stay low and crowd together: take a threshold between the 100th and 101st
        # score, so that about 100 detections are compared and none sits at the top-300 cut (where ties break).
        scores = np.sort(_predict(task, pt, path, conf=0.001).boxes.conf.numpy())[::-1]
        conf = float((scores[99] + scores[100]) / 2)
        r = _post(server, path.read_bytes(), conf=conf)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == "rtdetr"
        ours = np.array([[*d["box"], d["score"], d["class_id"]] for d in body["detections"]]).reshape(-1, 6)
        b = _predict(task, pt, path, conf=conf).boxes
        ref = np.concatenate([b.xyxy.numpy(), b.conf.numpy()[:, None], b.cls.numpy()[:, None]], 1)
        assert len(ref) > 0, "nothing to compare: lower conf"
        problems = compare_detections(ours, ref, conf, Tolerance())
        assert problems == [], (len(ours), len(ref), problems[:4])
        print(f"\nserved rtdetr {path.name}: {len(ref)} detections matched")
    r = _post(server, sample_images[0].read_bytes(), encoding="rle")
    assert r.status_code == 400 and "do not apply to a rtdetr model" in r.json()["error"]["message"]


def test_a_bad_image_is_its_own_4xx(served, sample_images):
    _, _, server = served
    r = _post(server, b"not an image")
    assert 400 <= r.status_code < 500 and "error" in r.json()
    assert _post(server, sample_images[1].read_bytes()).status_code == 200  # the worker still serves
