"""``python -m export`` for every covered architecture, its checks, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export import verify
from export.__main__ import main
from export.exporter import export_model
from export.tasks import EXPORT_TASKS, raw_network
from handler.image.decode import decode_image
from handler.pipeline import YoloPipeline
from handler.runtime.artifacts import load_artifacts
from tiers import slow_fixture
from tools.server import REPO_ROOT


# (weights, --head): seeded YAML builds of each architecture; YOLO26 with both of its heads.
YAML_MODELS = [
    ("yolov8n.yaml", "auto"),
    ("yolo11n.yaml", "auto"),
    ("yolo26n.yaml", "auto"),  # 8.4.190 default: the one-to-many head with NMS
    ("yolo26n.yaml", "one2one"),  # the NMS-free head, as predict(nms=False)
    ("yolov8n-pose.yaml", "auto"),
    ("yolo26n-pose.yaml", "auto"),
    ("yolo26n-pose.yaml", "one2one"),
    ("yolov10n.yaml", "one2one"),  # v10Detect, with its NMS-free head
    ("yolov8n-seg.yaml", "auto"),  # Segment: Proto on P3
    ("yolo11n-seg.yaml", "auto"),
    ("yolo26n-seg.yaml", "auto"),  # Segment26: Proto26 on all levels
    ("yolov8n-obb.yaml", "auto"),  # OBB: angle = (sigmoid - 0.25) * pi, rotated NMS
    ("yolo11n-obb.yaml", "auto"),
    ("yolo26n-obb.yaml", "auto"),  # OBB26: raw angle
    ("yolo26n-obb.yaml", "one2one"),
]
TASK_OF_NAME = {"pose": "pose", "seg": "segment", "obb": "obb"}
# Seed of the YAML build, 0 unless listed: seed 0's random yolo11n-seg masks are empty on the sample
# images, so every detection is dropped (as the predictor drops it) and there would be nothing to compare.
SEEDS = {"yolo11n-seg.yaml": 1}


@slow_fixture(scope="module", params=YAML_MODELS, ids=lambda p: f"{p[0]}-{p[1]}")
def yaml_export(request, tmp_path_factory):
    weights, head = request.param
    out = tmp_path_factory.mktemp(Path(weights).stem)
    # check=True runs the trace, decode and predict checks of export/verify.py and raises on a mismatch
    return export_model(weights, out, [640, 640], head=head, seed=SEEDS.get(weights, 0), log=lambda _: None)


def test_yaml_model_exports_and_matches_ultralytics_decode(yaml_export, sample_images):
    meta = yaml_export.metadata
    assert meta["end2end"] == yaml_export.loaded.end2end
    suffix = Path(yaml_export.loaded.source).stem.rsplit("-", 1)[-1]
    assert meta["task"] == TASK_OF_NAME.get(suffix, "detect")
    pipeline = YoloPipeline.from_dir(yaml_export.out_dir)
    # also with a class filter and class-agnostic NMS / top-k
    image = decode_image(sample_images[0].read_bytes())
    classes = (0, 5) if yaml_export.loaded.nc > 5 else (0,)
    assert verify.check_decode(yaml_export.loaded, pipeline, image, classes=classes) > 0
    assert verify.check_decode(yaml_export.loaded, pipeline, image, agnostic=True) > 0


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("hw", [(640, 640), (480, 640), (640, 320)])
def test_backbone_runs_at_any_stride_multiple_and_batch(pose_export, b, hw):
    backbone, _, meta = load_artifacts(pose_export.out_dir, torch.device("cpu"))
    x = torch.rand(b, 3, *hw)
    with torch.no_grad():
        out = backbone(x)
    nk = meta["kpt_shape"][0] * meta["kpt_shape"][1]
    assert [tuple(o.shape) for o in out] == [(b, 64 + meta["nc"] + nk, hw[0] // s, hw[1] // s) for s in (8, 16, 32)]
    verify.check_trace(raw_network(pose_export.loaded), backbone, [(b, *hw)])  # raises above TRACE_TOL
    # what the trace check does not see: each image of a batch gets the outputs it gets alone
    for i in range(b):
        with torch.no_grad():
            alone = backbone(x[i : i + 1])
        for level, (batched, single) in enumerate(zip(out, alone)):
            assert torch.allclose(batched[i : i + 1], single, atol=verify.TRACE_TOL), (i, level)


def test_real_pose_model_matches_predict(pose_export, sample_images):
    pipeline = YoloPipeline.from_dir(pose_export.out_dir)
    counts = [verify.check_predict(pose_export.loaded, pipeline, p) for p in sample_images]
    assert all(n > 0 for n in counts), counts  # people in bus.jpg and zidane.jpg


@pytest.mark.parametrize("imgsz,mode", [(320, "rect"), ([480, 640], "rect"), (640, "square")])
def test_real_pose_model_matches_predict_at_other_sizes(pose_export, sample_images, imgsz, mode):
    pipeline = YoloPipeline.from_dir(pose_export.out_dir, imgsz=imgsz, letterbox_mode=mode)
    matched = {p.name: verify.check_predict(pose_export.loaded, pipeline, p) for p in sample_images}
    assert all(n > 0 for n in matched.values()), f"nothing compared at {imgsz} {mode}: {matched}"  # bus and zidane hold people


def test_metadata_is_embedded_and_readable(pose_export, pose_weights):
    on_disk = json.loads((pose_export.out_dir / "metadata.json").read_text())
    _, _, embedded = load_artifacts(pose_export.out_dir, torch.device("cpu"))
    assert on_disk == embedded
    assert on_disk["names"] == ["person"] and on_disk["task"] == "pose" and on_disk["kpt_shape"] == [17, 3]
    assert on_disk["stride"] == [8.0, 16.0, 32.0] and on_disk["reg_max"] == 16 and on_disk["end2end"] is False
    assert on_disk["imgsz"] == [640, 640] and on_disk["letterbox"] == "rect"
    assert on_disk["weights"]["sha256"] == __import__("hashlib").sha256(pose_weights.read_bytes()).hexdigest()
    assert {"ultralytics", "torch"} <= set(on_disk["versions"]) and on_disk["contract"] == 2
    assert on_disk["nm"] == 0 and on_disk["angle_decode"] is None


def test_a_wrong_postprocessor_fails_the_check(pose_weights, tmp_path, monkeypatch, capsys):
    """The check can fail: decode v8 keypoints with the YOLO26 formula and export must exit 1."""
    from export import tasks

    real = tasks.load_model

    def wrong_decoder(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.kpt_decode = 2  # Pose26 offsets on a v8/11 Pose head
        return loaded

    monkeypatch.setattr("export.exporter.load_model", wrong_decoder)
    assert main(["--weights", str(pose_weights), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "does not match Ultralytics" in err and "keypoint" in err


def _cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "export", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_help_documents_every_option():
    done = _cli("--help")
    assert done.returncode == 0
    for opt in ("--weights", "--imgsz", "--name", "--out", "--head", "--letterbox", "--archive", "--model-store"):
        assert opt in done.stdout


def test_cli_exports_and_reports_steps(tmp_path, pose_weights):
    done = _cli("--weights", str(pose_weights), "--imgsz", "300", "--out", str(tmp_path / "o"), "--no-check")
    assert done.returncode == 0, done.stderr
    assert "not a multiple of the max stride 32; using [320, 320]" in done.stdout
    assert "trace backbone" in done.stdout and " s\n" in done.stdout
    for f in ("backbone.pt", "postprocess.pt", "metadata.json"):
        assert (tmp_path / "o" / f).is_file() and str(tmp_path / "o" / f) in done.stdout
    assert json.loads((tmp_path / "o" / "metadata.json").read_text())["imgsz"] == [320, 320]


def _one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-1000:])
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-1000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_missing_file(tmp_path):
    _one_line_error(_cli("--weights", str(tmp_path / "nope.pt")), "not found")


@pytest.mark.parametrize("content", [b"hello, not a model\n", b"PK\x03\x04garbage" + bytes(100)])
def test_cli_not_a_checkpoint(tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    _one_line_error(_cli("--weights", str(bad)), "bad.pt")


def test_a_task_without_an_exporter_is_refused_by_name():
    """Every task of Ultralytics 8.4.190 is exported now; a future one is refused with its name."""
    from types import SimpleNamespace

    from export.checkpoint import ExportError
    from export.tasks import export_task, task_of_head

    assert {"detect", "pose", "segment", "obb", "classify", "semantic", "depth", "rtdetr"} <= set(EXPORT_TASKS)
    with pytest.raises(ExportError, match="task 'stereo' is not supported yet"):
        export_task(SimpleNamespace(task="stereo", path=Path("x.pt")))
    with pytest.raises(ExportError, match="task 'stereo' is not supported yet"):
        task_of_head("StereoHead", "stereo", "x.pt")
    with pytest.raises(ExportError, match=r"detect head 'YOLOEDetect' is not supported yet \(supported: Detect, v10Detect\)"):
        task_of_head("YOLOEDetect", "detect", "x.pt")


def test_the_export_table_and_the_handler_registry_name_the_same_tasks():
    """One task list: each served task (handler/tasks/) has one export entry (export/tasks.py), and the reverse,
    and no head class belongs to two entries."""
    from handler.tasks import TASKS

    assert list(EXPORT_TASKS) == list(TASKS)
    assert all(EXPORT_TASKS[name].served is TASKS[name] for name in TASKS)
    heads = [h for t in EXPORT_TASKS.values() for h in t.heads]
    assert len(heads) == len(set(heads))


def test_a_head_is_looked_up_by_its_class():
    """RT-DETR's head is Ultralytics' "detect" task, exported and served as rtdetr; the rest by their heads."""
    from export.tasks import task_of_head

    assert task_of_head("RTDETRDecoder", "detect", "x.pt").name == "rtdetr"
    assert task_of_head("Pose26", "pose", "x.pt").name == "pose"
    assert task_of_head("v10Detect", "detect", "x.pt").name == "detect"


def test_cli_one2one_on_a_model_without_that_head(pose_weights):
    _one_line_error(_cli("--weights", str(pose_weights), "--head", "one2one"), "one-to-one")
