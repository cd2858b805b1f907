"""handler/image/letterbox.py must equal ultralytics.data.augment.LetterBox pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
from ultralytics.data.augment import LetterBox

from handler.image.letterbox import letterbox, letterbox_params

SIZES = [
    (1, 1), (1, 640), (640, 1), (1, 3000), (3000, 1), (2, 7), (7, 2), (17, 33), (100, 100), (239, 320),
    (480, 640), (640, 480), (481, 641), (720, 1280), (1080, 810), (1080, 1920), (333, 999), (1000, 1001),
    (64, 64), (639, 641), (1281, 719),
]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["rect", "square"])
@pytest.mark.parametrize("imgsz", [640, 320, (480, 640), (384, 224)])
def test_letterbox_matches_ultralytics_pixel_for_pixel(mode, imgsz):
    ref = LetterBox(imgsz, auto=mode == "rect", stride=32)
    for i, (h, w) in enumerate(SIZES):
        image = _image(h, w, i)
        ours, params = letterbox(image, imgsz, 32, mode)
        theirs = ref(image=image.copy())
        assert ours.shape == theirs.shape, (h, w, ours.shape, theirs.shape)
        assert np.array_equal(ours, theirs), f"pixels differ for {h}x{w}"
        assert (params.input_h, params.input_w) == ours.shape[:2]
        assert params.input_h % 32 == 0 and params.input_w % 32 == 0


def test_params_match_ultralytics_get_params():
    ref = LetterBox(640, auto=True, stride=32)
    for h, w in SIZES:
        p = ref.get_params({"img": np.zeros((h, w, 3), np.uint8)})
        ours = letterbox_params((h, w), 640, 32, "rect")
        assert (ours.resized_w, ours.resized_h) == p["new_unpad"]
        assert (ours.pad_top, ours.pad_left) == (p["top"], p["left"])


def test_geometry_row_inverts_the_placement():
    """A hand-computed case whose gains differ per axis and whose padding is on one axis only, so that
    swapping gain_x/gain_y or the pads fails: 481x641 (h x w) into a 640 square.

    r = min(640/481, 640/641); resized w = round(641 r) = 640, h = round(481 r) = round(480.25) = 480;
    dh = 640 - 480 = 160 -> top = round(80 - 0.1) = 80; dw = 0 -> left = 0."""
    p = letterbox_params((481, 641), 640, 32, "square")
    assert (p.resized_h, p.resized_w, p.pad_top, p.pad_left, p.input_h, p.input_w) == (480, 640, 80, 0, 640, 640)
    assert p.as_row() == pytest.approx([0.0, 80.0, 640 / 641, 480 / 481, 641.0, 481.0])


def test_geometry_row_agrees_with_ultralytics_scale_boxes():
    """Input-space boxes mapped back with our row equal Ultralytics' ``scale_boxes`` from the shapes alone."""
    import torch
    from ultralytics.utils.ops import scale_boxes

    for (h, w), mode in [((481, 641), "square"), ((720, 1280), "rect"), ((1080, 810), "rect"), ((333, 999), "square")]:
        p = letterbox_params((h, w), 640, 32, mode)
        pad_left, pad_top, gx, gy, w0, h0 = p.as_row()
        boxes = torch.tensor([[pad_left + 3.0, pad_top + 5.0, pad_left + p.resized_w - 7.0, pad_top + p.resized_h - 2.0]])
        ours = (boxes - torch.tensor([pad_left, pad_top, pad_left, pad_top])) / torch.tensor([gx, gy, gx, gy])
        theirs = scale_boxes((p.input_h, p.input_w), boxes.clone(), (h, w))
        assert torch.allclose(ours, theirs, atol=0.02), (h, w, mode, ours.tolist(), theirs.tolist())


@pytest.mark.parametrize("bad", [(0, 10), (10, 0)])
def test_empty_image_is_an_error(bad):
    with pytest.raises(ValueError, match="at least 1x1"):
        letterbox_params(bad)


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="letterbox mode"):
        letterbox_params((10, 10), mode="stretch")
