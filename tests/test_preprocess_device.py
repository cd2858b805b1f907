"""``preprocess: device`` (handler/pipeline.py) and the overlap of input and forward (handler/runtime/overlap.py).

On a CPU device ``preprocess: device`` must give exactly the results of ``cpu``; on CUDA (skipped here with a
reason when there is none) it must too, and the side stream must order its inputs before their forwards."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from handler.config import HandlerConfig
from handler.image.decode import decode_image
from handler.image.letterbox import letterbox, letterbox_params
from handler.pipeline import YoloPipeline
from handler.runtime.overlap import SideStream, run_groups
from handler.tasks import TASKS

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
# bench/gpu_check/ runs this file on a machine without Ultralytics, on the export and images it carries
CARRIED = os.environ.get("YOLO_GPU_CHECK_EXPORTS")


@pytest.fixture(scope="module")
def pose_dir(request) -> Path:
    if CARRIED:
        return Path(CARRIED) / "pose"
    return request.getfixturevalue("pose_export").out_dir


@pytest.fixture(scope="module")
def photos(request) -> list[Path]:
    if CARRIED:
        return [Path(CARRIED) / "images" / name for name in ("bus.jpg", "zidane.jpg")]
    return request.getfixturevalue("sample_images")


# ---------------------------------------------------------------- the order of run_groups


def _log_run(n: int, ahead: bool) -> tuple[list[str], list[tuple[int, str]]]:
    log: list[str] = []
    fed: list[tuple[int, str]] = []

    def stage(k):
        log.append(f"stage{k}")
        return f"input{k}"

    def forward(k, x):
        log.append(f"forward{k}")
        fed.append((k, x))
        return f"feats{k}"

    def finish(k, feats):
        assert feats == f"feats{k}"
        log.append(f"finish{k}")

    run_groups(n, stage, forward, finish, ahead)
    return log, fed


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_in_order_runs_each_group_to_the_end(n):
    log, fed = _log_run(n, ahead=False)
    assert log == [f"{step}{k}" for k in range(n) for step in ("stage", "forward", "finish")]
    assert fed == [(k, f"input{k}") for k in range(n)]


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_ahead_stages_the_next_input_between_forward_and_finish(n):
    log, fed = _log_run(n, ahead=True)
    expected = ["stage0"] if n else []
    for k in range(n):
        expected.append(f"forward{k}")
        if k + 1 < n:
            expected.append(f"stage{k + 1}")
        expected.append(f"finish{k}")
    assert log == expected
    assert fed == [(k, f"input{k}") for k in range(n)]  # forward k gets stage k's input, never another
    assert log.count("stage0") == (1 if n else 0) and all(log.count(f"stage{k}") == 1 for k in range(n))


def test_side_stream_on_cpu_runs_inline():
    side = SideStream(torch.device("cpu"))
    assert not side.active
    side.begin()
    x = torch.arange(3)
    staged = side.stage(lambda: x * 2)
    assert staged.ready is None
    assert torch.equal(side.take(staged), torch.tensor([0, 2, 4]))


@pytest.mark.gpu
@needs_cuda
def test_side_stream_orders_its_work_between_the_main_streams():
    """Both orders the overlap relies on, with no CPU synchronisation in between: a side-stream stage reads an
    input that the main stream was still computing when ``begin`` was called, and the main stream reads the
    staged tensor only once the (slow) stage is complete."""
    device = torch.device("cuda:0")
    side = SideStream(device)
    assert side.active
    a = torch.rand(64 * 2**20, device=device)  # 256 MiB: each step takes a while

    def chain(y):  # elementwise only, so the same on any stream, bit for bit
        for _ in range(50):
            y = (y * 1.0001 + 0.5).remainder_(7.0)
        return y

    expected_src = chain(a.clone())
    expected = chain(expected_src.clone())
    torch.cuda.synchronize(device)
    src = chain(a.clone())  # queued on the main stream, not finished
    side.begin()
    staged = side.stage(lambda: chain(src.clone()))
    got = side.take(staged) * 1  # a kernel on the main stream
    assert torch.equal(src, expected_src)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------- which transforms the device reproduces


def _meta(task: str, letterbox_mode: str | None = "rect") -> dict:
    return {"task": task, "names": ["a", "b"], "max_stride": 32, "imgsz": [640, 640], "letterbox": letterbox_mode}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_gets_its_own_transform_on_the_device_or_is_refused(task):
    """For each registered task: the geometry it declares (``Task.placement``), placed on the device, makes the
    pixels and geometry of the task's CPU transform on every size tried, or the pipeline refuses it at construction."""
    meta = {**_meta(task, "rect" if TASKS[task].letterbox else None), "imgsz": [384, 640], "kpt_shape": [17, 3]}
    try:
        dev = YoloPipeline(torch.nn.Identity(), None, meta, preprocess="device")
    except ValueError as e:
        assert "preprocess: cpu" in str(e)
        assert task not in ("detect", "pose", "segment", "obb", "semantic", "depth", "rtdetr"), f"{task} has a device transform"
        return
    cpu = YoloPipeline(torch.nn.Identity(), None, meta, preprocess="cpu")
    rng = np.random.default_rng(1)
    for h, w in [(720, 1280), (1280, 720), (1, 500), (384, 640), (385, 641), (3, 3)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a, b = cpu.prepare(image), dev.prepare(image)
        assert a.params == b.params, (task, h, w)
        assert torch.equal(cpu.network_input([a]), dev.network_input([b])), (task, h, w)


def test_pipeline_refuses_device_preprocess_for_classify():
    with pytest.raises(ValueError, match="preprocess: cpu"):
        YoloPipeline(torch.nn.Identity(), None, _meta("classify", None), preprocess="device")


def test_pipeline_refuses_an_unknown_preprocess():
    with pytest.raises(ValueError, match="preprocess must be one of"):
        YoloPipeline(torch.nn.Identity(), None, _meta("detect"), preprocess="gpu")


def test_device_prepare_computes_only_the_geometry():
    pipe = YoloPipeline(torch.nn.Identity(), None, _meta("detect"), preprocess="device")
    image = np.zeros((720, 1280, 3), np.uint8)
    item = pipe.prepare(image)
    assert item.pixels is image
    assert item.params == letterbox_params((720, 1280), [640, 640], 32, "rect")


# ---------------------------------------------------------------- settings


def test_config_preprocess_default_and_values():
    assert HandlerConfig().preprocess == "cpu"
    assert HandlerConfig.from_dict({}).preprocess == "cpu"
    assert HandlerConfig.from_dict({"preprocess": "device"}).preprocess == "device"
    with pytest.raises(ValueError, match=r"handler\.preprocess must be one of \['cpu', 'device'\].*preprocess: cpu"):
        HandlerConfig.from_dict({"preprocess": "gpu"})


# ---------------------------------------------------------------- the real pose export


def _images(paths: list[Path]) -> list[np.ndarray]:
    """The sample photos plus sizes that share an input shape with them or hit the resize's edge cases."""
    rng = np.random.default_rng(0)
    photos = [decode_image(p.read_bytes()) for p in paths]
    bus = photos[0]
    synthetic = [
        np.ascontiguousarray(bus[::2, ::2]),  # exact 2x of the bus, same input shape as the bus
        rng.integers(0, 256, (1, 640, 3), dtype=np.uint8),
        rng.integers(0, 256, (640, 1, 3), dtype=np.uint8),
        rng.integers(0, 256, (2160, 3840, 3), dtype=np.uint8),
        np.ascontiguousarray(np.concatenate([bus, bus[:, ::-1]], axis=1)),  # a wide collage: more detections
    ]
    return photos + synthetic


@pytest.mark.gpu
@needs_cuda
def test_device_preprocess_takes_an_image_already_on_the_device(pose_dir, photos):
    """An image decoded on the GPU (a CUDA uint8[H, W, 3] tensor) goes through ``preprocess: device`` as is."""
    dev = YoloPipeline.from_dir(pose_dir, device="cuda:0", preprocess="device")
    image = decode_image(photos[0].read_bytes())
    on_gpu = torch.from_numpy(image).cuda()
    a = dev.infer([dev.prepare(image)])[0][0]
    b = dev.infer([dev.prepare(on_gpu)])[0][0]
    assert torch.equal(a.rows, b.rows) and len(a.rows) > 0


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=[pytest.mark.gpu, needs_cuda])])
def test_device_preprocess_gives_the_cpu_results(pose_dir, photos, device):
    """Through YoloPipeline on the real yolo11n-pose export, one mixed batch: the same detections, bit for bit
    (CUDA: the same network input; the forward is the same kernels on the same tensor)."""
    cpu = YoloPipeline.from_dir(pose_dir, device=device, preprocess="cpu")
    dev = YoloPipeline.from_dir(pose_dir, device=device, preprocess="device")
    images = _images(photos)
    ref, ref_times = cpu.infer([cpu.prepare(im) for im in images])
    got, got_times = dev.infer([dev.prepare(im) for im in images])
    assert got_times.forwards == ref_times.forwards  # the same shape groups, in the same order
    assert len(ref_times.forwards) < len(images)  # some images share a forward
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a.rows, b.rows), f"image {i}: {a.rows.shape} vs {b.rows.shape}"
    assert sum(len(a.rows) for a in ref) > 5  # there were detections to compare
    for im in images[:2]:
        assert torch.equal(cpu.network_input([cpu.prepare(im)]).cpu(), dev.network_input([dev.prepare(im)]).cpu())


@pytest.mark.slow
def test_cpu_preprocess_path_is_unchanged(pose_dir, photos):
    """The CPU path is what it was: ``to_input`` of the transformed pixels, one forward per input shape."""
    pipe = YoloPipeline.from_dir(pose_dir)
    images = _images(photos)
    items = [pipe.prepare(im) for im in images]
    for item, im in zip(items, images):
        expected, params = letterbox(im, pipe.imgsz, pipe.stride, pipe.letterbox_mode)
        assert np.array_equal(item.pixels, expected) and item.params == params
    out, times = pipe.infer(items)
    groups: dict[tuple[int, int], list[int]] = {}  # the loop infer ran before the device mode, written out
    for i, item in enumerate(items):
        groups.setdefault(item.pixels.shape[:2], []).append(i)
    assert times.forwards == [(len(idx), h, w) for (h, w), idx in groups.items()]
    with torch.inference_mode():
        for idx in groups.values():
            feats = list(pipe.backbone(pipe.to_input([items[i].pixels for i in idx])))
            expected = pipe.task.postprocess(pipe.postprocess, feats, [items[i] for i in idx], pipe.nc)
            for i, e in zip(idx, expected):
                assert torch.equal(out[i].rows, e.rows), i
