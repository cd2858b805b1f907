"""Helpers shared by the serving tests (handler unit tests and the TorchServe integration tests)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from ts.context import Context, RequestProcessor

# Two forwards of the same image at batch 1 and batch > 1 differ by up to ~1e-4 px on CPU (oneDNN picks
# other kernels), so a value rounded for the response may move by one unit of its last decimal.
PIXEL_TOL = 0.02
SCORE_TOL = 2e-4


def response_rows(body: dict) -> np.ndarray:
    """Response JSON -> rows ``[x1, y1, x2, y2, score, class_id, (kx, ky, kv)*]`` (export.verify's layout)."""
    rows = []
    for d in body["detections"]:
        row = [*d["box"], d["score"], d["class_id"]]
        for kpt in d.get("keypoints", []):
            row += kpt
        rows.append(row)
    width = 6 + 3 * len(body["detections"][0].get("keypoints", [])) if rows else 6
    return np.asarray(rows, dtype=np.float64).reshape(-1, width)


def assert_same_response(a: dict, b: dict) -> None:
    """Equal up to one rounding unit: same model, image, detection count, order and classes."""
    assert {k: a[k] for k in ("model", "model_version", "task", "image")} == {k: b[k] for k in ("model", "model_version", "task", "image")}
    assert [d["class_id"] for d in a["detections"]] == [d["class_id"] for d in b["detections"]]
    ra, rb = response_rows(a), response_rows(b)
    assert ra.shape == rb.shape
    if len(ra):
        assert np.abs(ra[:, :4] - rb[:, :4]).max() <= PIXEL_TOL
        assert np.abs(ra[:, 4] - rb[:, 4]).max() <= SCORE_TOL
        if ra.shape[1] > 6:
            k = np.abs(ra[:, 6:] - rb[:, 6:]).reshape(len(ra), -1, 3)
            assert k[..., :2].max() <= PIXEL_TOL and k[..., 2].max() <= SCORE_TOL


def check_schema(body: dict, pose: bool) -> None:
    """The response schema of docs/tasks.md, exactly (no extra or missing keys)."""
    assert set(body) == {"model", "model_version", "task", "image", "detections", "speed_ms"}
    assert set(body["image"]) == {"width", "height"}
    assert set(body["speed_ms"]) == {"preprocess", "inference", "postprocess"}
    assert all(isinstance(v, float) and v >= 0 for v in body["speed_ms"].values())
    keys = {"box", "score", "class_id", "class_name"} | ({"keypoints"} if pose else set())
    scores = [d["score"] for d in body["detections"]]
    assert scores == sorted(scores, reverse=True)
    for d in body["detections"]:
        assert set(d) == keys
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= body["image"]["width"] and 0 <= y1 <= y2 <= body["image"]["height"]
        assert 0 <= d["score"] <= 1 and isinstance(d["class_id"], int) and isinstance(d["class_name"], str)
        if pose:
            assert len(d["keypoints"]) == 17 and all(len(k) == 3 for k in d["keypoints"])


def check_tracked_frame(f: int, ids, boxes, kpts, want_ids, want_boxes, want_kpts) -> float:
    """One frame on which ``YOLO.track`` shows tracks, against ours: the same IDs in the same order, each box at IoU
    >= 0.99 with its counterpart, and the keypoints of the same detection (within 1 px). Returns the smallest IoU."""
    from handler.tracking.matching import box_iou

    assert list(ids) == list(want_ids), f"frame {f}: IDs {list(ids)}, YOLO.track {list(want_ids)}"
    iou = box_iou(np.asarray(boxes, np.float32), np.asarray(want_boxes, np.float32)).diagonal()
    assert iou.min() >= 0.99, f"frame {f}: box IoU {iou.min():.4f}"
    assert np.abs(np.asarray(kpts) - np.asarray(want_kpts)).max() < 1.0, f"frame {f}: keypoints of another detection"
    return float(iou.min())


def build_test_store(export_dir, tmp_path_factory, name: str, handler_settings: dict | None = None,
                     torchserve_settings: dict | None = None):
    """``yolo.mar`` with ``handler_settings`` (and TorchServe's own keys ``torchserve_settings``, e.g.
    ``maxBatchDelay``, written into a copy of the export) in a fresh model store (``build_archive`` gives the
    archiver a private TMPDIR, so parallel builds never share its staging directory)."""
    import yaml

    from export.archive import build_archive
    from handler.contract import MODEL_CONFIG_FILE

    store = tmp_path_factory.mktemp(name)
    if torchserve_settings:
        copy = tmp_path_factory.mktemp(f"{name}_export")
        shutil.copytree(export_dir, copy, dirs_exist_ok=True)
        (copy / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(torchserve_settings))
        export_dir = copy
    build_archive(export_dir, "yolo", store, handler_settings=handler_settings, keep_user_config=bool(torchserve_settings))
    return store


def logged_batches(server, log_start: int, requests: int, timeout: float = 30.0) -> list[tuple[int, int]]:
    """``(requests, served)`` of each batch in the worker log after ``log_start``, once the batches of
    ``requests`` requests are there: the frontend writes a worker's log lines a little after the answers."""
    from handler.yolo_handler import batches_in_log

    deadline = time.monotonic() + timeout
    while True:
        batches = batches_in_log(server.model_log()[log_start:])
        if sum(n for n, _ in batches) >= requests or time.monotonic() > deadline:
            return batches
        time.sleep(0.05)


# ---------------------------------------------------------------- the handler with a fake context


class RecordingMetrics:
    def __init__(self):
        self.recorded: list[tuple[str, float, str]] = []

    def add_time(self, name, value, idx=None, unit="ms", dimensions=None, metric_type=None):
        self.recorded.append((name, value, unit))

    def add_metric(self, name, value, unit, idx=None, dimensions=None, metric_type=None):
        self.recorded.append((name, value, unit))


def make_context(model_dir: Path, handler_section: dict | None = None) -> Context:
    ctx = Context("yolo", str(model_dir), {"model": {}}, 4, None, "0.12", model_yaml_config={"handler": handler_section or {"warmup": 1}})
    ctx.metrics = RecordingMetrics()
    return ctx


def run_batch(handler, ctx: Context, rows: list[dict], content_types: list[str] | None = None):
    types = content_types or ["image/jpeg"] * len(rows)
    ctx.request_processor = [RequestProcessor({"body": {"content-type": t}}) for t in types]
    out = [json.loads(text) for text in handler.handle(rows, ctx)]  # the handler returns JSON text
    statuses = [rp.get_response_status_code() for rp in ctx.request_processor]
    return out, statuses


# ---------------------------------------------------------------- archives with a test handler

WRAPPED_HANDLERS = Path(__file__).resolve().parent / "wrapped_handlers"


def wrapped_archive(export_dir: Path, store: Path, handler_file: str, version: str = "1.0", handler_settings: dict | None = None,
                    batch_size: int = 4, name: str = "yolo", torchserve: dict | None = None) -> Path:
    """``store/NAME[-VERSION].mar`` of ``export_dir`` (archived as ``version``) whose TorchServe handler is
    ``tests/wrapped_handlers/HANDLER_FILE``, a subclass of ``YoloHandler``; the ``handler/`` package is packed as
    ``build_archive`` packs it; ``torchserve`` adds model-config.yaml keys. ``handler_settings`` are not checked against
    the model (a test may want a bad one)."""
    import os
    import subprocess
    import tempfile

    from export.archive import archiver_command, model_config_yaml, stage_handler_code
    from handler.contract import MODEL_CONFIG_FILE, archive_file_name

    (export_dir / MODEL_CONFIG_FILE).write_text(model_config_yaml(handler_settings, batch_size, torchserve=torchserve))
    stage_handler_code(export_dir)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="archiver_", dir=store) as tmp:
        cmd = archiver_command(export_dir, name, Path(tmp), version)
        cmd[cmd.index("--handler") + 1] = str(WRAPPED_HANDLERS / handler_file)
        subprocess.run(cmd, check=True, capture_output=True, timeout=300, env={**os.environ, "TMPDIR": tmp})
        return (Path(tmp) / f"{name}.mar").replace(store / archive_file_name(name, version))
