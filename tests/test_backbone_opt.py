"""bench/backbone_opt.py: the rewritten backbones give the plain backbone's detections (within 1e-3)."""

from __future__ import annotations

import pytest
import torch

from bench.backbone_opt import BACKBONE_OPTS, optimise_backbone, rect_shapes
from handler.image.decode import decode_image
from handler.pipeline import YoloPipeline

DET_TOL = 1e-3  # boxes, keypoints (pixels) and scores


@pytest.fixture(scope="module")
def plain(pose_export) -> YoloPipeline:
    return YoloPipeline.from_dir(pose_export.out_dir)


@pytest.mark.parametrize("opt", [o for o in BACKBONE_OPTS if o != "none"])
def test_same_detections(plain, sample_images, opt):
    example = torch.zeros(1, 3, 640, 480).contiguous(memory_format=torch.channels_last)
    p = plain
    opt_pipeline = YoloPipeline(optimise_backbone(p.backbone, opt, example), p.postprocess, p.metadata,
                                imgsz=p.imgsz, letterbox_mode=p.letterbox_mode)
    for path in sample_images:
        image = decode_image(path.read_bytes())
        ref = plain.infer([plain.prepare(image)])[0][0].rows
        for _ in range(3):  # the profiling runs, then the optimised plan: each must agree
            got = opt_pipeline.infer([opt_pipeline.prepare(image)])[0][0].rows
            assert len(ref) > 0
            assert got.shape == ref.shape, f"{opt} on {path.name}: {len(got)} detections vs {len(ref)}"
            assert torch.equal(got[:, 5], ref[:, 5]), f"{opt} on {path.name}: classes differ"
            diff = float((got - ref).abs().max())
            assert diff <= DET_TOL, f"{opt} on {path.name}: detections differ by {diff:.2e} > {DET_TOL}"


def test_unknown_option_names_the_choices(plain):
    with pytest.raises(ValueError, match="backbone rewrite must be one of"):
        optimise_backbone(plain.backbone, "fast")


def test_not_torchscript_is_refused():
    with pytest.raises(ValueError, match="use opt none"):
        optimise_backbone(torch.nn.Identity(), "freeze")


def test_rect_shapes_are_the_letterbox_shapes():
    shapes = rect_shapes(640, 32)
    assert len(shapes) == len(set(shapes)) == 39
    assert all(h % 32 == 0 and w % 32 == 0 and 640 in (h, w) for _, _, h, w in shapes)
    assert (1, 3, 640, 480) in shapes and (1, 3, 384, 640) in shapes
