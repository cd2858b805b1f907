"""The CUDA path: device map and FP16. Skipped, with the reason shown in the summary, without CUDA."""

from __future__ import annotations

import pytest
import torch

from export import verify
from handler.image.decode import decode_image
from handler.pipeline import YoloPipeline

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("half", [False, True])
def test_cuda_pipeline_matches_predict(pose_export, sample_images, half):
    pipeline = YoloPipeline.from_dir(pose_export.out_dir, device="cuda:0", half=half)
    assert next(iter(pipeline.backbone.parameters())).device.type == "cuda"
    tol = verify.Tolerance(min_iou=0.98 if half else 0.99, score=0.01 if half else 0.005, keypoint_px=1.0 if half else 0.5)
    for path in sample_images:
        image = decode_image(path.read_bytes())
        ours = pipeline.infer([pipeline.prepare(image)])[0][0].rows.numpy()
        ref = verify.ultralytics_predict(pose_export.loaded, path, pipeline.imgsz)
        assert not verify.compare_detections(ours, ref, 0.25, tol)
        assert len(ours) > 0


def test_half_is_refused_on_cpu(pose_export):
    with pytest.raises(ValueError, match="CUDA"):
        YoloPipeline.from_dir(pose_export.out_dir, device="cpu", half=True)
