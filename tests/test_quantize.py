"""export/quantize.py: the INT8 backbone (torchao PT2E + X86InductorQuantizer + AOTInductor), its drift report
and its refusals. The compile is slow (minutes on 2 cores): that test is marked slow."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from export.checkpoint import ExportError
from export.quantize import (
    INT8,
    MIN_RECALL,
    Drift,
    Int8DriftError,
    calibration_images,
    match,
    refuse_drift,
)


def _rows(*dets):  # (x1, y1, x2, y2, score, cls) -> float[N, 6]
    return torch.tensor(dets, dtype=torch.float32).reshape(-1, 6)


def test_no_calib_folder_is_a_usage_error(tmp_path):
    with pytest.raises(ExportError, match="needs --calib"):
        calibration_images(None)
    with pytest.raises(ExportError, match="not a folder"):
        calibration_images(tmp_path / "missing")


def test_folder_without_a_readable_image_is_a_usage_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "b.txt").write_text("hello")
    with pytest.raises(ExportError, match=r"no readable image \(2 file"):
        calibration_images(tmp_path)


def test_undecodable_images_are_skipped_and_counted(tmp_path, sample_images):
    shutil.copy(sample_images[0], tmp_path / "bus.jpg")
    (tmp_path / "broken.jpg").write_bytes(sample_images[0].read_bytes()[:100])
    (tmp_path / "notes.txt").write_text("x")
    calib = calibration_images(tmp_path)
    assert calib.names == ["bus.jpg"] and calib.skipped == 2
    assert calib.images[0].ndim == 3 and calib.images[0].shape[2] == 3


def test_match_needs_same_class_and_iou():
    ref = _rows((0, 0, 100, 100, 0.9, 0), (200, 200, 300, 300, 0.8, 1), (0, 0, 50, 50, 0.5, 0))
    got = _rows((1, 1, 100, 100, 0.85, 0),  # IoU 0.98 with ref 0
                (200, 200, 300, 300, 0.8, 2),  # same box, other class
                (0, 0, 50, 40, 0.5, 0))  # IoU 0.8 with ref 2: below 0.9
    assert match(ref, got) == [(0, 0)]
    assert match(ref, _rows()) == [] and match(_rows(), got) == []


def test_match_is_one_to_one():
    ref = _rows((0, 0, 100, 100, 0.9, 0), (0, 0, 100, 101, 0.8, 0))
    got = _rows((0, 0, 100, 100, 0.9, 0))
    assert match(ref, got) == [(0, 0)]


def test_refusal_below_min_recall_unless_accepted():
    good = Drift(2, 100, 100, 100, 0.01, 0.02)
    bad = Drift(2, 100, 90, 90, 0.01, 0.02)
    refuse_drift([good, good], accept_drift=False)
    with pytest.raises(Int8DriftError, match="INT8 keeps 0.900 .* pass --accept-drift"):
        refuse_drift([good, bad], accept_drift=False)
    refuse_drift([good, bad], accept_drift=True)
    assert bad.recall < MIN_RECALL <= good.recall


@pytest.mark.slow
@pytest.mark.integration
def test_int8_export_reports_drift_and_serves(tmp_path, pose_weights, sample_images):
    from export.quantize import export_int8
    from handler.service import YoloService

    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(sample_images[0], calib / "bus.jpg")  # zidane.jpg stays held out
    (calib / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    lines: list[str] = []
    result = export_int8(str(pose_weights), tmp_path / "out", calib, [640, 640], accept_drift=True, log=lines.append)
    assert result.skipped == 1 and any("1 file(s) did not decode" in s for s in lines)
    assert result.calibration.images == 1 and result.held_out.images == 1
    assert result.calibration.fp32_detections > 0 and result.held_out.fp32_detections > 0
    # docs/cpu-speed.md measured recall 1.000 and |dscore| <= 0.056 on these two images (4 and 2 detections);
    # accept_drift=True keeps the files either way, so the quality is asserted here, not by the refusal
    for drift in (result.calibration, result.held_out):
        assert drift.recall >= MIN_RECALL, drift.line("INT8 vs FP32")
        assert drift.dscore_max <= 0.1, drift.line("INT8 vs FP32")
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["precision"] == INT8 and meta["format"] == "aoti" and meta["backbone"] == "backbone.pt2"
    service = YoloService.from_dir(tmp_path / "out")
    answer = service.predict(sample_images[1].read_bytes())
    assert answer.status == 200 and answer.body["precision"] == INT8
    assert type(service.pipeline.backbone).__name__ == "AotiBackbone"
    # through a real TorchServe: the .mar carries the INT8 backbone.pt2 and every answer says so
    import requests

    from export.archive import build_archive
    from tools.server import running_server

    store = build_archive(tmp_path / "out", "yolo", tmp_path / "store", handler_settings={"warmup": 1}).parent
    with running_server(store, tmp_path / "torchserve", block_ultralytics=True) as server:
        r = requests.post(server.predictions_url, data=sample_images[1].read_bytes(),
                          headers={**server.headers(), "Content-Type": "image/jpeg"}, timeout=300)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["precision"] == INT8 and body["detections"], body
        # the served answer is the in-process one (same INT8 backbone), up to rounding
        assert [d["class_id"] for d in body["detections"]] == [d["class_id"] for d in answer.body["detections"]]
