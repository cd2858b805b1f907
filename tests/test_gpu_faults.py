"""A GPU worker whose CUDA is unusable: the load fails with the CUDA error by default, or
serves on CPU with a loud log line and a metric when ``cpu_fallback: true``. CUDA is made to fail here
on a CPU machine."""

from __future__ import annotations

import logging

import pytest
import torch

from handler.service import YoloService
from handler.yolo_handler import METRIC_CPU_FALLBACK, YoloHandler  # imported before CUDA is faked (ts checks it at import)
from serving_support import make_context


def _gpu_context(export_dir, section: dict):
    ctx = make_context(export_dir, {"warmup": 0, **section})
    ctx.system_properties["gpu_id"] = 0  # TorchServe gave this worker GPU 0
    return ctx


@pytest.fixture
def cuda_fails_at_load(monkeypatch):
    """CUDA "available", and loading onto it fails like a driver out of memory."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    original = YoloService.from_dir.__func__

    def from_dir(cls, model_dir, config=None, device="cpu", **kw):
        if torch.device(device).type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; simulated)")
        return original(cls, model_dir, config, device, **kw)

    monkeypatch.setattr(YoloService, "from_dir", classmethod(from_dir))


def test_default_fails_the_load_with_the_cuda_error(pose_export, cuda_fails_at_load):
    with pytest.raises(RuntimeError, match=r"cannot load on GPU 0: CUDA out of memory.*cpu_fallback: true"):
        YoloHandler().initialize(_gpu_context(pose_export.out_dir, {}))


def test_no_cuda_at_all_fails_the_load_by_default(pose_export, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"assigned GPU 0 to this worker, but CUDA is not available"):
        YoloHandler().initialize(_gpu_context(pose_export.out_dir, {}))


@pytest.mark.parametrize("no_cuda", [False, True], ids=["oom-at-load", "no-cuda"])
def test_cpu_fallback_serves_on_cpu_loudly(pose_export, cuda_fails_at_load, monkeypatch, caplog, sample_images, no_cuda):
    from serving_support import run_batch

    if no_cuda:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ctx = _gpu_context(pose_export.out_dir, {"cpu_fallback": True})
    h = YoloHandler()
    with caplog.at_level(logging.ERROR, logger="handler.yolo_handler"):
        h.initialize(ctx)
    assert h.service.pipeline.device.type == "cpu"
    assert "CPU FALLBACK" in caplog.text and "GPU 0" in caplog.text
    assert (METRIC_CPU_FALLBACK, 1, "count") in ctx.metrics.recorded
    (body,), statuses = run_batch(h, ctx, [{"body": bytearray(sample_images[0].read_bytes())}])
    assert statuses == [200] and body["detections"]


def test_other_load_errors_are_not_taken_for_cuda_faults(pose_export, monkeypatch):
    def broken(cls, *a, **kw):
        raise RuntimeError("PytorchStreamReader failed reading zip archive")

    monkeypatch.setattr(YoloService, "from_dir", classmethod(broken))
    with pytest.raises(RuntimeError, match="PytorchStreamReader"):  # no fallback, no CUDA wording
        YoloHandler().initialize(_gpu_context(pose_export.out_dir, {"cpu_fallback": True}))
