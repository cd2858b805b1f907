"""handler/image/letterbox_torch.py must equal handler/image/letterbox.py (OpenCV, Ultralytics) pixel for pixel, on CPU
tensors and, where there is one, on CUDA; and its network input must equal YoloPipeline.to_input's."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from handler.image import letterbox_torch as lt
from handler.image.letterbox import letterbox, letterbox_params
from handler.image.stretch import stretch
from handler.pipeline import YoloPipeline

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]

# (h, w): 1xN and Nx1, tiny, odd, exact 2x and 3x of the 640 letterbox (1280x960, 1920x1440), upscales,
# 16:9 frames, a large one, and sizes just off a multiple of the stride
SIZES = [
    (1, 1), (1, 2), (2, 1), (1, 640), (640, 1), (1, 3000), (3000, 1), (2, 7), (7, 2), (3, 3), (17, 33),
    (100, 100), (239, 320), (320, 240), (480, 640), (640, 480), (481, 641), (639, 641), (720, 1280),
    (1080, 810), (1080, 1920), (1280, 960), (960, 1280), (1920, 1440), (333, 999), (1000, 1001),
    (1281, 719), (2160, 3840),
]
IMGSZ = [640, 320, (480, 640), (384, 224)]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["rect", "square"])
@pytest.mark.parametrize("imgsz", IMGSZ)
def test_letterbox_equals_opencv_letterbox(device, mode, imgsz):
    for i, (h, w) in enumerate(SIZES):
        image = _image(h, w, i)
        expected, params = letterbox(image, imgsz, 32, mode)
        ours, ours_params = lt.letterbox(torch.from_numpy(image).to(device), imgsz, 32, mode)
        assert ours_params == params, (h, w)
        assert ours.device.type == device and ours.dtype == torch.uint8
        got = ours.cpu().numpy()
        assert got.shape == expected.shape, (h, w, got.shape, expected.shape)
        diff = np.abs(got.astype(int) - expected.astype(int))
        assert not diff.any(), f"{h}x{w} -> {imgsz} {mode}: {np.count_nonzero(diff)} values differ, max {diff.max()}"


# (src_h, src_w, dst_h, dst_w) that the letterbox never asks for: independent axes, exact 2x on one axis
# only (plain INTER_LINEAR) and on both (INTER_AREA), 3x and 4x, upscale on one axis and downscale on the other
RESIZES = [
    (1, 1, 5, 9), (5, 9, 1, 1), (2, 2, 1, 1), (4, 6, 2, 3), (8, 8, 4, 5), (8, 8, 5, 4), (30, 30, 10, 10),
    (40, 40, 10, 10), (7, 1000, 21, 50), (1000, 7, 50, 21), (480, 640, 960, 1280), (481, 641, 240, 320),
    (1080, 1920, 540, 960), (1080, 1920, 360, 640), (299, 301, 151, 149), (64, 64, 63, 65),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src_h,src_w,h,w", RESIZES)
def test_resize_equals_cv2_inter_linear(device, src_h, src_w, h, w):
    image = _image(src_h, src_w, src_h * 7 + src_w)
    expected = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    got = lt.resize_linear(torch.from_numpy(image).to(device), h, w).cpu().numpy()
    assert np.array_equal(got, expected), f"{src_h}x{src_w} -> {h}x{w}: max diff {np.abs(got.astype(int) - expected).max()}"


def test_stretch_placement_equals_handler_stretch():
    for i, (h, w) in enumerate([(37, 101), (480, 640), (1080, 1920), (1, 1), (641, 3)]):
        image = _image(h, w, i)
        expected, params = stretch(image, (384, 640))
        assert np.array_equal(lt.place(torch.from_numpy(image), params).numpy(), expected), (h, w)


def test_place_writes_into_a_batch_slot_and_checks_shapes():
    image = _image(100, 50, 1)
    params = letterbox_params((100, 50), 64, 32, "rect")
    batch = torch.zeros((2, params.input_h, params.input_w, 3), dtype=torch.uint8)
    assert lt.place(torch.from_numpy(image), params, out=batch[1]).data_ptr() == batch[1].data_ptr()
    assert np.array_equal(batch[1].numpy(), letterbox(image, 64, 32, "rect")[0])
    assert not batch[0].any()
    with pytest.raises(ValueError, match="placement is for"):
        lt.place(torch.from_numpy(image[:99]), params)
    with pytest.raises(ValueError, match="out must be"):
        lt.place(torch.from_numpy(image), params, out=batch[1, :1])


@pytest.mark.parametrize("bad", [torch.zeros((4, 4), dtype=torch.uint8), torch.zeros((4, 4, 3)), torch.zeros((4, 4, 4), dtype=torch.uint8)])
def test_letterbox_refuses_other_tensors(bad):
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        lt.letterbox(bad)


def _pipeline(device: str = "cpu", half: bool = False, preprocess: str = "cpu") -> YoloPipeline:
    """A pipeline without exported files: only its transform and input conversion are used."""
    meta = {"task": "detect", "names": ["a"], "max_stride": 32, "imgsz": [640, 640], "letterbox": "rect"}
    return YoloPipeline(torch.nn.Identity(), None, meta, device=device, half=half, preprocess=preprocess)


@pytest.mark.parametrize("device,half", [("cpu", False), pytest.param("cuda", False, marks=[pytest.mark.gpu, needs_cuda]),
                                         pytest.param("cuda", True, marks=[pytest.mark.gpu, needs_cuda])])
def test_network_input_equals_to_input(device, half):
    """Same values, dtype and (channels-last) strides as ``to_input`` on the CPU-letterboxed pixels; several
    source sizes that land on one input shape (640x480 rect) in one batch."""
    images = [_image(h, w, i) for i, (h, w) in enumerate([(480, 640), (960, 1280), (1440, 1920), (481, 641)])]
    cpu, dev = _pipeline(device, half, "cpu"), _pipeline(device, half, "device")
    expected = cpu.to_input([cpu.prepare(im).pixels for im in images])
    prepared = [dev.prepare(im) for im in images]
    assert all(p.pixels is im for p, im in zip(prepared, images))  # device mode: the image itself, to upload
    got = dev.network_input(prepared)
    assert got.dtype == expected.dtype == (torch.float16 if half else torch.float32)
    assert got.shape == expected.shape == (4, 3, 480, 640)
    assert got.stride() == expected.stride()
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.cpu(), expected.cpu())


def test_to_network_input_is_rgb_over_255():
    batch = torch.from_numpy(_image(3, 5, 0)[None])  # [1, 3, 5, 3] BGR
    x = lt.to_network_input(batch)
    assert torch.equal(x[0, 0], batch[0, :, :, 2].float() / 255)  # R from the last BGR channel
    assert torch.equal(x[0, 2], batch[0, :, :, 0].float() / 255)
