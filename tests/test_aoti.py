"""``python -m export --format aoti``: the torch.export + AOTInductor backbone (``backbone.pt2``).

One AOTInductor compile for the whole session (``aoti_export``: about 60 s on an idle 2-core CPU,
a few minutes on a loaded one), shared by every test here.
"""

from __future__ import annotations

import json
import zipfile

import pytest
import requests
import torch
from serving_support import assert_same_response, check_schema

from export.__main__ import parse_args
from export.aoti import torchscript_pipeline
from export.archive import build_archive
from export.exporter import export_model
from handler.image.decode import decode_image
from handler.pipeline import YoloPipeline
from handler.runtime.aoti import AOTI_BACKBONE_FILE, AOTI_MAX_BATCH, AOTI_MAX_SIDE, AotiBackbone, load_aoti_backbone
from handler.runtime.artifacts import load_artifacts
from handler.service import YoloService
from tools.server import running_server

pytestmark = pytest.mark.slow  # compiles AOTInductor packages

RAW_TOL = 5e-4  # against TorchScript, <= 5e-4 on raw outputs (docs/aoti.md)


@pytest.fixture(scope="session")
def aoti_export(tmp_path_factory, pose_weights):
    """yolo11n-pose.pt exported with --format aoti, all checks on (Ultralytics parity of the TorchScript
    pair, then backbone.pt2 against backbone.pt)."""
    out = tmp_path_factory.mktemp("aoti_export")
    return export_model(str(pose_weights), out, [640, 640], backbone_format="aoti", log=lambda _: None)


@pytest.fixture(scope="session")
def pipelines(aoti_export) -> tuple[YoloPipeline, YoloPipeline]:
    """(TorchScript pipeline, AOTInductor pipeline) of the same export."""
    compiled = YoloPipeline.from_dir(aoti_export.out_dir)
    return torchscript_pipeline(compiled, aoti_export.out_dir), compiled


def test_format_option_defaults_to_torchscript():
    assert parse_args(["--weights", "w.pt"]).format == "torchscript"
    assert parse_args(["--weights", "w.pt", "--format", "aoti"]).format == "aoti"
    with pytest.raises(SystemExit):
        parse_args(["--weights", "w.pt", "--format", "onnx"])


def test_metadata_names_the_format_and_the_handler_loads_it(aoti_export):
    meta = aoti_export.metadata
    assert (meta["format"], meta["backbone"]) == ("aoti", AOTI_BACKBONE_FILE)
    assert json.loads((aoti_export.out_dir / "metadata.json").read_text()) == meta
    backbone, _, loaded_meta = load_artifacts(aoti_export.out_dir, torch.device("cpu"))
    assert isinstance(backbone, AotiBackbone) and loaded_meta == meta
    _, embedded = load_aoti_backbone(aoti_export.out_dir / AOTI_BACKBONE_FILE, torch.device("cpu"))
    assert embedded == {k: v for k, v in meta.items() if k != "runtimes"}  # the list is written after the compile
    aoti_entry = next(e for e in meta["runtimes"] if e["runtime"] == "aoti")
    assert aoti_entry["cpu_flags"] and aoti_entry["files"] == [AOTI_BACKBONE_FILE]  # what the worker's ISA guard reads
    steps = [what for what, _ in aoti_export.steps]
    assert any("AOTInductor compile" in s for s in steps) and any(f"check {AOTI_BACKBONE_FILE}" in s for s in steps), steps


@pytest.mark.parametrize("b, h, w", [(1, 640, 640), (2, 480, 640), (3, 640, 320), (1, 32, 96), (1, 64, AOTI_MAX_SIDE)])
def test_raw_outputs_match_torchscript(pipelines, b, h, w):
    """Dynamic batch, H and W: one .pt2 runs every shape the traced backbone runs, within 5e-4."""
    ts, compiled = pipelines
    x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(b * h + w))
    with torch.inference_mode():
        ref, got = ts.backbone(x), compiled.backbone(x)
    assert len(ref) == len(got) == 3
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        diff = float((g - r).abs().max())
        assert diff <= RAW_TOL, f"raw outputs differ by {diff:.2e} at {b}x3x{h}x{w}"


def test_detections_identical_on_test_images(pipelines, sample_images):
    """Same count, classes and order; boxes, keypoints and scores equal at the response's precision."""
    ts, compiled = pipelines
    images = [decode_image(p.read_bytes()) for p in sample_images]
    ref = [o.rows for o in ts.infer([ts.prepare(i) for i in images])[0]]
    got = [o.rows for o in compiled.infer([compiled.prepare(i) for i in images])[0]]
    for path, image, r, g in zip(sample_images, images, ref, got):
        assert len(r) > 0, f"no detections on {path.name}: nothing compared"
        assert torch.equal(r[:, 5], g[:, 5]), f"{path.name}: classes differ"
        diff = float((r - g).abs().max())
        assert diff <= 1e-2, f"{path.name}: detections differ by {diff:.2e}"
        body = lambda pipeline: YoloService(pipeline).predict(path.read_bytes()).body  # noqa: E731
        assert_same_response(body(compiled), body(ts))


def test_half_wrong_device_and_out_of_bounds_shapes_are_refused(aoti_export):
    backbone, _ = load_aoti_backbone(aoti_export.out_dir / AOTI_BACKBONE_FILE, torch.device("cpu"))
    for shape in [(1, 3, 64, AOTI_MAX_SIDE + 32), (AOTI_MAX_BATCH + 1, 3, 32, 32)]:  # not compiled for: no UB
        with pytest.raises(ValueError, match="outside the AOTInductor backbone's bounds"):
            backbone(torch.zeros(shape))
    with pytest.raises(ValueError, match="half"):
        backbone.half()
    if not torch.cuda.is_available():  # a CPU package asked for CUDA: a clear error, not a crash
        with pytest.raises(ValueError, match="compiled for cpu"):
            load_aoti_backbone(aoti_export.out_dir / AOTI_BACKBONE_FILE, torch.device("cuda"))


def test_archive_holds_the_pt2_beside_the_traced_backbone(aoti_export, tmp_path):
    """The traced backbone.pt stays in every archive (the reference, and the runtime a worker can always choose)."""
    mar = build_archive(aoti_export.out_dir, "yolo", tmp_path)
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert {AOTI_BACKBONE_FILE, "backbone.pt", "postprocess.pt", "metadata.json", "handler/runtime/aoti.py"} <= names
    assert manifest["model"]["serializedFile"] == "backbone.pt"


@pytest.mark.integration
def test_torchserve_serves_the_pt2_transparently(aoti_export, pipelines, sample_images, tmp_path):
    """The .mar of an aoti export, a real TorchServe, the same JSON as the TorchScript pipeline."""
    ts, _ = pipelines
    store = build_archive(aoti_export.out_dir, "yolo", tmp_path / "store").parent
    with running_server(store, tmp_path / "torchserve") as server:
        headers = {**server.headers(), "Content-Type": "image/jpeg"}
        for path in sample_images:
            r = requests.post(server.predictions_url, data=path.read_bytes(), headers=headers, timeout=120)
            assert r.status_code == 200, r.text
            body = r.json()
            check_schema(body, pose=True)
            expected = YoloService(ts).predict(path.read_bytes()).body
            assert len(expected["detections"]) > 0
            assert_same_response(body, expected)
