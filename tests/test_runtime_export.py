"""The backbone runtimes on the real yolo11n-pose: the export's runtime step (AOTInductor with freezing, the OpenVINO IR),
each runtime's answers against ``YOLO.predict`` itself, ``auto`` and the user's override, the ISA guard on a real
``.pt2``, BF16 and OpenVINO INT8 with their drift reports, and one real TorchServe whose description names the runtime.

Slow: one AOTInductor compile (about 40 s on an idle 2-core CPU, minutes on a busy one) and three exports."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import requests
from serving_support import assert_same_response

from export.archive import build_archive
from export.exporter import export_model
from export.runtimes import thread_counts
from export.verify import Tolerance, compare_detections, ultralytics_predict
from handler.config import HandlerConfig
from handler.contract import ArtifactError
from handler.image.decode import decode_image
from handler.runtime import cpu_flags
from handler.runtime.runtimes import proven_runtimes
from handler.service import YoloService
from handler.tasks.detect import Thresholds
from tools.server import running_server

pytestmark = pytest.mark.slow

RUNTIMES = ("torchscript", "aoti", "openvino")


@pytest.fixture(scope="module")
def runtimes_export(tmp_path_factory, pose_weights):
    """yolo11n-pose.pt exported with every runtime (the CLI's default, ``--runtimes auto``, with both installed)."""
    out = tmp_path_factory.mktemp("runtimes_export")
    lines: list[str] = []
    result = export_model(str(pose_weights), out, [640, 640], runtimes=["aoti", "openvino"], log=lines.append)
    return result, lines


@pytest.fixture(scope="module")
def calib(tmp_path_factory, sample_images):
    """bus.jpg as the calibration set; zidane.jpg stays held out."""
    d = tmp_path_factory.mktemp("calib")
    shutil.copy(sample_images[0], d / sample_images[0].name)
    return d


def test_the_export_proves_measures_and_records_every_runtime(runtimes_export):
    result, lines = runtimes_export
    entries = proven_runtimes(result.metadata)
    assert sorted(e.runtime for e in entries) == sorted(RUNTIMES), lines
    totals = [sum(ms for _, ms in e.forward_ms) for e in entries]  # measured at 1 thread and at this machine's auto count
    assert totals == sorted(totals) and totals[0] > 0
    assert all([t for t, _ in e.forward_ms] == [str(n) for n in thread_counts()] for e in entries)
    assert all(e.precision == "fp32" for e in entries)
    aoti = next(e for e in entries if e.runtime == "aoti")
    assert list(aoti.cpu_flags) == cpu_flags.isa_flags()  # the ISA the compiled code may use
    on_disk = json.loads((result.out_dir / "metadata.json").read_text())
    assert on_disk == result.metadata
    for runtime in ("aoti", "openvino"):
        assert any(f"runtime {runtime}: check == backbone.pt, == YOLO.predict" in s for s in lines), lines
    assert any("runtimes, raw forward p50" in s for s in lines)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_each_runtime_answers_as_ultralytics_does(runtimes_export, sample_images, runtime):
    """Served pipeline with that runtime against ``YOLO(weights).predict(file)``: matched, IoU >= 0.99, |dscore| <= 0.005,
    keypoints within 0.5 px (export.verify's predict tolerance)."""
    result, _ = runtimes_export
    service = YoloService.from_dir(result.out_dir, HandlerConfig(runtime=runtime))
    assert (service.describe()["runtime"], service.describe()["precision"]) == (runtime, "fp32")
    pipeline = service.pipeline
    for path in sample_images:
        ours = pipeline.infer([pipeline.prepare(decode_image(path.read_bytes()))])[0][0].rows.numpy()
        ref = ultralytics_predict(result.loaded, path, pipeline.imgsz)
        assert len(ref) > 0, f"Ultralytics finds nothing on {path.name}: nothing compared"
        problems = compare_detections(ours, ref, Thresholds().conf, Tolerance())
        assert problems == [], f"{runtime} on {path.name}: {problems}"
        assert "precision" not in service.predict(path.read_bytes()).body  # FP32: the answer is Ultralytics' own


def test_auto_takes_the_export_choice_and_the_user_value_wins(runtimes_export, sample_images):
    result, _ = runtimes_export
    first = result.metadata["runtimes"][0]["runtime"]
    assert YoloService.from_dir(result.out_dir).describe()["runtime"] == first
    for runtime in RUNTIMES:
        assert YoloService.from_dir(result.out_dir, HandlerConfig(runtime=runtime)).pipeline.runtime == runtime


def test_a_real_pt2_is_refused_on_a_cpu_without_its_isa(runtimes_export, monkeypatch):
    """The guard reads the flags the export recorded; here the CPU is made to lack one of them."""
    result, _ = runtimes_export
    have = frozenset(cpu_flags.isa_flags())
    lacking = max(have)
    monkeypatch.setattr(cpu_flags, "cpu_flags", lambda cpuinfo=None: have - {lacking})
    with pytest.raises(ArtifactError, match=f"runtime: aoti: backbone.pt2 needs {lacking}, which this CPU lacks"):
        YoloService.from_dir(result.out_dir, HandlerConfig(runtime="aoti"))
    assert YoloService.from_dir(result.out_dir).pipeline.runtime != "aoti"  # auto takes the next proven one


def test_openvino_takes_the_worker_threads_and_torch_keeps_one(runtimes_export):
    """OpenVINO is compiled with the worker's thread count (the policy of handler/runtime/device.py); torch, which then
    runs only the input conversion and the postprocessor, drops to one thread."""
    import torch

    result, _ = runtimes_export
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        backbone = YoloService.from_dir(result.out_dir, HandlerConfig(runtime="openvino")).pipeline.backbone
        assert backbone.threads == 2 and int(backbone._compiled.get_property("INFERENCE_NUM_THREADS")) == 2
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        YoloService.from_dir(result.out_dir, HandlerConfig(runtime="torchscript"))
        assert torch.get_num_threads() == 2  # a torch runtime keeps the worker's count
    finally:
        torch.set_num_threads(before)


@pytest.mark.integration
def test_torchserve_serves_the_chosen_runtime_and_says_so(runtimes_export, sample_images, tmp_path):
    """The .mar carries backbone.pt and every proven runtime beside it; the worker serves the export's choice, its
    description names it, and its answers are the in-process ones."""
    result, _ = runtimes_export
    mar = build_archive(result.out_dir, "yolo", tmp_path / "store", handler_settings={"warmup": 1})
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config = z.read("model-config.yaml").decode()
    assert {"backbone.pt", "backbone.pt2", "backbone.xml", "backbone.bin", "postprocess.pt"} <= names
    assert manifest["model"]["serializedFile"] == "backbone.pt"
    first = result.metadata["runtimes"][0]["runtime"]
    assert "runtime: auto" in config and f"runtime: auto serves {first} fp32" in config
    in_process = YoloService.from_dir(result.out_dir)
    with running_server(mar.parent, tmp_path / "torchserve", block_ultralytics=True) as server:
        r = requests.get(f"{server.management_url}/models/yolo", params={"customized": "true"}, headers=server.headers("management"), timeout=60)
        assert r.status_code == 200, r.text
        described = r.json()[0]["customizedMetadata"]  # TorchServe parses the handler's JSON text (or passes it on)
        described = json.loads(described) if isinstance(described, str) else described
        assert (described["runtime"], described["precision"]) == (first, "fp32")
        for path in sample_images:
            r = requests.post(server.predictions_url, data=path.read_bytes(),
                              headers={**server.headers(), "Content-Type": "image/jpeg"}, timeout=120)
            assert r.status_code == 200, r.text
            expected = in_process.predict(path.read_bytes()).body
            assert expected["detections"]
            assert_same_response(r.json(), expected)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_reports_its_drift_and_says_so_in_every_answer(tmp_path, pose_weights, sample_images, calib, precision):
    """``--quantize bf16`` and ``--quantize int8`` (OpenVINO + NNCF): the drift against FP32 on the calibration and
    held-out images, the runtime recorded first, ``"precision"`` in every answer and in the description."""
    if precision == "bf16" and not cpu_flags.has_bf16():
        pytest.skip(f"this CPU has no BF16 ({' / '.join(cpu_flags.BF16_FLAGS)} absent: {cpu_flags.summary()})")
    from export.quantize import MIN_RECALL, export_reduced

    lines: list[str] = []
    out = export_reduced(precision, "openvino", str(pose_weights), tmp_path / "out", calib, [640, 640], log=lines.append)
    label = precision.upper()
    assert any(s.strip().startswith(f"{label} drift, calibration: 1 image(s)") for s in lines), lines
    assert any(s.strip().startswith(f"{label} drift, held-out: 1 image(s)") for s in lines), lines
    assert out.calibration.fp32_detections > 0 and out.held_out.fp32_detections > 0
    assert min(out.calibration.recall, out.held_out.recall) >= MIN_RECALL  # else the export would have been refused
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["precision"] == precision
    assert [(e["runtime"], e["precision"]) for e in meta["runtimes"]] == [("openvino", precision), ("torchscript", "fp32")]
    service = YoloService.from_dir(tmp_path / "out")
    assert (service.describe()["runtime"], service.describe()["precision"]) == ("openvino", precision)
    for path in sample_images:
        body = service.predict(path.read_bytes()).body
        assert body["precision"] == precision and body["detections"]
    fp32 = YoloService.from_dir(tmp_path / "out", HandlerConfig(runtime="torchscript"))  # the reference stays in the export
    assert "precision" not in fp32.predict(sample_images[0].read_bytes()).body


def test_reduced_precision_below_the_recall_floor_is_refused_and_leaves_the_fp32_export(tmp_path, pose_weights, calib, monkeypatch):
    """The refusal itself, forced: the drift is replaced by one that keeps 90 % of the detections."""
    from export import quantize
    from export.quantize import Drift, Int8DriftError, export_reduced

    monkeypatch.setattr(quantize, "drift", lambda fp32, reduced, images, precision: Drift(len(images), 10, 9, 9, 0.01, 0.02, precision))
    with pytest.raises(Int8DriftError, match=r"INT8 keeps 0\.900 of the FP32 detections .* pass --accept-drift"):
        export_reduced("int8", "openvino", str(pose_weights), tmp_path / "out", calib, [640, 640], log=lambda _: None)
    assert not (tmp_path / "out" / "backbone.xml").exists()
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert "runtimes" not in meta and "precision" not in meta
    assert YoloService.from_dir(tmp_path / "out").describe()["precision"] == "fp32"
