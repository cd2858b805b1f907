"""A worker whose model cannot load for good answers at once: every request, and the describe request, get a
JSON 503 with the load error and what to do (``handler.service.FailedModel``), instead of a worker that
crash-loops while requests wait unanswered. A CUDA error still fails the load (TorchServe retries it).

First the handler with a fake context, then the same archives through a real TorchServe started with the plain
``torchserve --start`` (slow tier)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from ts.context import RequestProcessor

from handler.contract import BACKBONE_FILE, CONTRACT_VERSION, METADATA_FILE, POSTPROCESS_FILE
from handler.errors import ModelLoadFailed
from handler.service import FailedModel
from handler.yolo_handler import METRIC_LOAD_FAILED, YoloHandler
from serving_support import make_context, run_batch


def _copy_export(export_dir: Path, dst: Path) -> Path:
    shutil.copytree(export_dir, dst, ignore=shutil.ignore_patterns("code", "model-config.yaml"))
    return dst


def _with_embedded_metadata(export_dir: Path, dst: Path, **changes) -> Path:
    """A copy of the export whose two TorchScript files embed metadata with ``changes`` (what another release
    or another exporter would have written), and ``metadata.json`` to match."""
    _copy_export(export_dir, dst)
    meta = None
    for name in (BACKBONE_FILE, POSTPROCESS_FILE):
        extra = {METADATA_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit in torch 2.14
            module = torch.jit.load(str(dst / name), _extra_files=extra)
            meta = {**json.loads(extra[METADATA_FILE]), **changes}
            torch.jit.save(module, str(dst / name), _extra_files={METADATA_FILE: json.dumps(meta)})
    (dst / METADATA_FILE).write_text(json.dumps(meta))
    return dst


def _describe(handler: YoloHandler, ctx) -> tuple[int, dict]:
    ctx.request_processor = [RequestProcessor({"describe": "True"})]
    (text,) = handler.handle([{}], ctx)
    return ctx.request_processor[0].get_response_status_code(), json.loads(text)


# What each broken model must say: (how it is broken, the words of its error).
BROKEN = {
    "setting": "handler.imgsz [600, 600] is not a multiple of the model's max stride 32",
    "tracking": "unknown key(s) ['max_stream']",
    "corrupt": f"{BACKBONE_FILE} cannot be loaded as TorchScript (PytorchStreamReader failed",
    "missing": f"{BACKBONE_FILE} not found",
    "contract": f"contract version 1, this handler reads {CONTRACT_VERSION}",
    "task": "task 'landmarks' is not served by this handler",
}


def _broken_context(kind: str, export_dir: Path, tmp_path: Path):
    """A fake worker context whose model cannot load, broken the way ``kind`` says."""
    section, model_dir = {"warmup": 0}, tmp_path / kind
    if kind == "setting":
        section["imgsz"] = 600
        _copy_export(export_dir, model_dir)
    elif kind == "tracking":
        _copy_export(export_dir, model_dir)
    elif kind == "corrupt":
        _copy_export(export_dir, model_dir)
        (model_dir / BACKBONE_FILE).write_bytes(b"not a TorchScript file" * 100)
    elif kind == "missing":
        _copy_export(export_dir, model_dir)
        (model_dir / BACKBONE_FILE).unlink()
    elif kind == "contract":
        _with_embedded_metadata(export_dir, model_dir, contract=1)
    elif kind == "task":
        _with_embedded_metadata(export_dir, model_dir, task="landmarks")
    ctx = make_context(model_dir, section)
    if kind == "tracking":
        ctx.model_yaml_config["tracking"] = {"max_stream": 4}
    ctx.model_name, ctx.manifest = "yolo", {"model": {"modelVersion": "2.0"}}
    return ctx


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_model_that_cannot_load_answers_every_request_with_its_error(kind, pose_export, sample_images, tmp_path):
    ctx = _broken_context(kind, pose_export.out_dir, tmp_path)
    h = YoloHandler()
    h.initialize(ctx)  # the worker stays up
    assert isinstance(h.service, FailedModel)
    image = bytearray(sample_images[0].read_bytes())
    bodies, statuses = run_batch(h, ctx, [{"body": image}, {"body": bytearray(b"junk")}, {"body": image, "conf": bytearray(b"2")}])
    assert statuses == [503, 503, 503], statuses
    for body in bodies:
        assert set(body) == {"error"} and body["error"]["type"] == "model_load_failed", body
        message = body["error"]["message"]
        assert message.startswith("yolo 2.0 could not load: ") and BROKEN[kind] in message, message
        assert "yolo-ts-export --archive" in message and "logs/model_log.log" in message, message
    status, described = _describe(h, ctx)
    assert status == 503 and described["error"] == bodies[0]["error"], described
    assert (described["model"], described["model_version"]) == ("yolo", "2.0")
    assert ModelLoadFailed.message_in(described) == bodies[0]["error"]["message"]
    assert (METRIC_LOAD_FAILED, 1, "count") in ctx.metrics.recorded


def test_an_oip_request_gets_the_error_in_the_v2_shape(pose_export, tmp_path):
    ctx = _broken_context("setting", pose_export.out_dir, tmp_path)
    h = YoloHandler()
    h.initialize(ctx)
    v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}]}
    bodies, statuses = run_batch(h, ctx, [{"body": v2}, {"body": {"inputs": "not a list"}}], ["application/json"] * 2)
    assert statuses == [503, 503]
    assert [set(b) for b in bodies] == [{"error"}, {"error"}] and all(isinstance(b["error"], str) for b in bodies), bodies
    assert all(BROKEN["setting"] in b["error"] for b in bodies)


def test_a_model_that_loads_reports_the_gauge_at_zero(pose_export, sample_images):
    ctx = make_context(pose_export.out_dir, {"warmup": 0})
    h = YoloHandler()
    h.initialize(ctx)
    assert (METRIC_LOAD_FAILED, 0, "count") in ctx.metrics.recorded
    status, described = _describe(h, ctx)
    assert status == 200 and ModelLoadFailed.message_in(described) is None and described["task"] == "pose"


def test_the_load_error_is_read_from_a_description():
    body = ModelLoadFailed("yolo 2.0 could not load: x").body()
    assert ModelLoadFailed.message_in(body) == "yolo 2.0 could not load: x"
    assert ModelLoadFailed.message_in({"error": {"type": "invalid_image", "message": "m"}}) is None
    assert ModelLoadFailed.message_in({"task": "pose"}) is None and ModelLoadFailed.message_in("text") is None
