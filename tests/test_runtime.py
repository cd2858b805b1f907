"""The backbone runtime setting (``handler: runtime:``), its choice under ``auto``, the refusals (a runtime not
installed, a CPU without the ISA of a ``.pt2``, BF16 on a CPU without it) and the CPU flags they read. Fast: nothing
is compiled; a model directory holds empty stand-in files, and the choice never opens them before it decides.
The real exports of each runtime, their parity with Ultralytics and a real TorchServe are in test_runtime_export.py."""

from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest
import torch

from export.archive import model_config_yaml, runtime_files
from handler.config import HandlerConfig
from handler.contract import ArtifactError
from handler.image.decode import decode_image
from handler.runtime import cpu_flags
from handler.runtime.aoti import check_cpu
from handler.runtime.runtimes import RUNTIME_SETTINGS, RuntimeEntry, choose_runtime, proven_runtimes

CPU = torch.device("cpu")
NO_BF16 = frozenset({"sse2", "avx", "avx2", "fma", "avx512f"})
WITH_BF16 = NO_BF16 | {"avx512_bf16"}


def _meta(*entries: RuntimeEntry, **extra) -> dict:
    return {"format": "torchscript", "backbone": "backbone.pt", "runtimes": [e.as_dict() for e in entries], **extra}


OV = RuntimeEntry("openvino", "fp32", ("backbone.xml", "backbone.bin"), (("1", 20.0), ("2", 12.0)))
AOTI = RuntimeEntry("aoti", "fp32", ("backbone.pt2",), (("1", 25.0), ("2", 14.0)), cpu_flags=("avx2", "avx512f"))
TS = RuntimeEntry("torchscript", "fp32", ("backbone.pt",), (("1", 40.0), ("2", 13.0)))


@pytest.fixture
def model_dir(tmp_path):
    for name in ("backbone.pt", "backbone.pt2", "backbone.xml", "backbone.bin", "postprocess.pt"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


@pytest.fixture
def flags(monkeypatch):
    """Set what /proc/cpuinfo says for the code under test."""
    def set_flags(value):
        monkeypatch.setattr(cpu_flags, "cpu_flags", lambda cpuinfo=cpu_flags.CPUINFO: value)
    return set_flags


@pytest.fixture
def no_openvino(monkeypatch):
    """``import openvino`` fails, as where the package is not installed."""
    monkeypatch.setitem(sys.modules, "openvino", None)


# ---------------------------------------------------------------- the setting


def test_runtime_setting_is_validated_like_the_other_keys():
    assert HandlerConfig().runtime == "auto"
    for value in RUNTIME_SETTINGS:
        assert HandlerConfig.from_dict({"runtime": value}).runtime == value
    with pytest.raises(ValueError, match=r"handler.runtime must be one of \['auto', 'torchscript', 'aoti', 'openvino'\], got 'onnx'"):
        HandlerConfig.from_dict({"runtime": "onnx"})


def test_archive_config_writes_the_setting_and_what_the_export_proved():
    text = model_config_yaml({}, metadata={"max_stride": 32, **_meta(OV, AOTI, TS)})
    assert "  runtime: auto  #" in text
    assert "#   openvino fp32: 20.0 ms at 1, 12.0 ms at 2 threads\n#   aoti fp32: 25.0 ms at 1, 14.0 ms at 2 threads\n" in text
    assert "runtime: auto serves openvino fp32 where it runs" in text
    assert "runtime: openvino" in model_config_yaml({"runtime": "openvino"})  # the user's value is kept


def test_archive_carries_every_proven_runtime_beside_backbone_pt():
    assert runtime_files(_meta(OV, AOTI, TS)) == ["backbone.xml", "backbone.bin", "backbone.pt2"]
    assert runtime_files({"format": "torchscript", "backbone": "backbone.pt"}) == []
    assert runtime_files({"format": "aoti", "backbone": "backbone.pt2"}) == ["backbone.pt2"]


# ---------------------------------------------------------------- the export's list


def test_exports_without_a_list_run_their_format():
    assert [e.runtime for e in proven_runtimes({"format": "torchscript", "backbone": "backbone.pt"})] == ["torchscript"]
    old_int8 = proven_runtimes({"format": "aoti", "backbone": "backbone.pt2", "precision": "int8"})
    assert [(e.runtime, e.precision) for e in old_int8] == [("aoti", "int8"), ("torchscript", "fp32")]


def test_entries_round_trip_through_the_metadata_json():
    meta = json.loads(json.dumps(_meta(OV, AOTI, TS)))
    assert proven_runtimes(meta) == [OV, AOTI, TS]


# ---------------------------------------------------------------- auto and the user's choice


def test_auto_takes_the_fastest_proven_runtime_that_runs(model_dir, flags):
    flags(WITH_BF16)
    assert choose_runtime("auto", _meta(OV, AOTI, TS), model_dir, CPU) == OV
    assert choose_runtime("auto", _meta(AOTI, OV, TS), model_dir, CPU) == AOTI


def test_an_explicit_runtime_always_wins(model_dir, flags):
    flags(WITH_BF16)
    meta = _meta(OV, AOTI, TS)
    assert choose_runtime("torchscript", meta, model_dir, CPU) == TS
    assert choose_runtime("aoti", meta, model_dir, CPU) == AOTI
    assert choose_runtime("torchscript", {"format": "aoti", "backbone": "backbone.pt2"}, model_dir, CPU).runtime == "torchscript"


def test_a_runtime_the_export_did_not_prove_is_refused(model_dir):
    with pytest.raises(ArtifactError, match=r"runtime: openvino: this export has no openvino backbone \(it has torchscript\); "
                                            r"export with `python -m export --runtimes openvino`"):
        choose_runtime("openvino", _meta(TS), model_dir, CPU)


def test_missing_openvino_fails_an_explicit_load_with_what_to_install(model_dir, no_openvino):
    with pytest.raises(ArtifactError) as e:
        choose_runtime("openvino", _meta(OV, TS), model_dir, CPU)
    assert str(e.value) == ("runtime: openvino: the openvino runtime needs the openvino package: "
                            "pip install 'yolo-torchserve[openvino]'")


def test_missing_openvino_makes_auto_take_the_next(model_dir, no_openvino, caplog):
    assert choose_runtime("auto", _meta(OV, TS), model_dir, CPU) == TS
    assert "skipping openvino fp32 (the openvino runtime needs the openvino package" in caplog.text


def test_missing_openvino_fails_the_service_load_in_one_line(tmp_path, pose_export, no_openvino):
    """Through the real loader of a real export (its files, its metadata with an openvino entry added)."""
    import shutil

    from export.quantize import rewrite_metadata
    from handler.service import YoloService

    d = tmp_path / "export"
    shutil.copytree(pose_export.out_dir, d)
    for name in OV.files:
        (d / name).write_bytes(b"")  # never read: the import fails first
    rewrite_metadata(d, {**pose_export.metadata, "runtimes": [OV.as_dict(), TS.as_dict()]})
    with pytest.raises(ArtifactError, match=r"^runtime: openvino: .*pip install 'yolo-torchserve\[openvino\]'$"):
        YoloService.from_dir(d, HandlerConfig(runtime="openvino"))
    served = YoloService.from_dir(d)  # auto: the next proven runtime
    assert served.describe()["runtime"] == "torchscript" and served.describe()["precision"] == "fp32"


def test_a_runtime_whose_files_are_not_there_is_skipped_or_refused(model_dir):
    (model_dir / "backbone.pt2").unlink()
    assert choose_runtime("auto", _meta(AOTI, TS), model_dir, CPU) == TS
    with pytest.raises(ArtifactError, match="backbone.pt2 is not in"):
        choose_runtime("aoti", _meta(AOTI, TS), model_dir, CPU)


def test_cpu_runtimes_are_not_chosen_for_a_cuda_worker(model_dir):
    cuda = torch.device("cuda:0")
    assert choose_runtime("auto", _meta(OV, AOTI, TS), model_dir, cuda) == TS
    with pytest.raises(ArtifactError, match="runs on CPU and this worker is on cuda:0"):
        choose_runtime("openvino", _meta(OV, TS), model_dir, cuda)


# ---------------------------------------------------------------- the ISA guard of a .pt2


def test_aoti_on_a_cpu_without_its_isa_is_refused_not_run(model_dir, flags):
    flags(frozenset({"sse2", "avx", "avx2", "fma"}))  # the .pt2 was compiled where avx512f was there
    assert choose_runtime("auto", _meta(AOTI, TS), model_dir, CPU) == TS
    with pytest.raises(ArtifactError, match="runtime: aoti: backbone.pt2 needs avx512f, which this CPU lacks"):
        choose_runtime("aoti", _meta(AOTI, TS), model_dir, CPU)


def test_the_aoti_loader_checks_the_isa_before_it_loads_the_code(tmp_path, flags):
    flags(frozenset({"avx2"}))
    missing_file = tmp_path / "backbone.pt2"  # not even there: the check comes first
    with pytest.raises(ValueError, match=r"compiled for a CPU with avx512_bf16 avx512f, which this CPU lacks \(it would crash with SIGILL\)"):
        check_cpu(missing_file, ["avx2", "avx512f", "avx512_bf16"])
    check_cpu(missing_file, ["avx2"])
    check_cpu(missing_file, None)  # a .pt2 exported before the ISA was recorded: nothing to check


# ---------------------------------------------------------------- BF16


def test_bf16_runtime_is_skipped_on_a_cpu_without_bf16(model_dir, flags):
    bf16 = RuntimeEntry("openvino", "bf16", OV.files)
    flags(NO_BF16)
    assert choose_runtime("auto", _meta(bf16, TS), model_dir, CPU) == TS
    with pytest.raises(ArtifactError, match="BF16 needs avx512_bf16 or amx_bf16, which this CPU lacks"):
        choose_runtime("openvino", _meta(bf16, TS), model_dir, CPU)
    flags(WITH_BF16)
    assert choose_runtime("auto", _meta(bf16, TS), model_dir, CPU) == bf16


def test_bf16_export_is_refused_on_a_cpu_without_bf16_before_anything_runs(flags, tmp_path):
    from export.checkpoint import ExportError
    from export.quantize import export_reduced

    flags(NO_BF16)
    with pytest.raises(ExportError, match=r"--quantize bf16 needs a CPU with BF16 \(avx512_bf16 or amx_bf16\); this CPU has avx2 avx512f"):
        export_reduced("bf16", "openvino", "never-read.pt", tmp_path / "out", tmp_path, [640, 640])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- /proc/cpuinfo


def test_cpu_flags_come_from_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 hypervisor\n\nprocessor\t: 1\nflags\t: fpu\n")
    flags = cpu_flags.cpu_flags(info)
    assert flags == frozenset({"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "hypervisor"})
    assert cpu_flags.isa_flags(flags) == ["avx2", "avx512_bf16", "avx512f", "sse2"]  # not fpu, not hypervisor
    assert cpu_flags.has_bf16(flags) and not cpu_flags.has_bf16(frozenset({"avx2"}))
    assert cpu_flags.missing(["avx2", "amx_tile"], flags) == ["amx_tile"]
    assert cpu_flags.summary(flags) == "avx2 avx512f avx512_bf16"
    assert cpu_flags.cpu_flags(tmp_path / "absent") is None and cpu_flags.missing(["avx2"], None) == []


def test_this_machine_reports_its_flags():
    """The flags every benchmark report and docs table names; on Linux they are never empty."""
    if cpu_flags.cpu_flags() is None:
        pytest.skip("no /proc/cpuinfo on this platform")
    assert cpu_flags.isa_flags() and cpu_flags.summary() != "unknown (no /proc/cpuinfo)"


def test_planar_input_is_the_channels_last_input_value_for_value(sample_images):
    """The NCHW input OpenVINO gets (handler.pipeline.planar_input) holds exactly the values torch runtimes get."""
    from handler.image.letterbox import letterbox
    from handler.pipeline import planar_input

    pixels = [letterbox(decode_image(p.read_bytes()), [640, 640], 32, "rect")[0] for p in sample_images[:1]] * 2
    planar = planar_input(pixels)
    rgb = torch.from_numpy(np.stack([cv2.cvtColor(p, cv2.COLOR_BGR2RGB) for p in pixels])).permute(0, 3, 1, 2).float().div_(255)
    assert planar.is_contiguous() and planar.shape == rgb.shape and torch.equal(planar, rgb)


def test_reduced_precision_without_openvino_is_a_usage_error(no_openvino, flags, tmp_path):
    from export.checkpoint import ExportError
    from export.quantize import export_reduced

    flags(WITH_BF16)
    with pytest.raises(ExportError, match=r"--quantize int8: openvino is not installed: pip install 'yolo-torchserve\[openvino\]'"):
        export_reduced("int8", "openvino", "never-read.pt", tmp_path / "out", tmp_path, [640, 640])


def test_a_named_runtime_that_cannot_be_built_is_a_usage_error(no_openvino):
    from export.checkpoint import ExportError
    from export.runtimes import resolve

    with pytest.raises(ExportError, match=r"--runtimes openvino: openvino is not installed"):
        resolve(["openvino"])
    lines: list[str] = []
    assert "openvino" not in resolve(["auto"], lines.append)  # auto leaves it out, and says why
    assert any("runtime openvino: not a candidate (openvino is not installed" in s for s in lines)


def test_a_candidate_that_fails_is_left_out_and_the_export_goes_on(tmp_path, pose_export, monkeypatch):
    """The runtime step on a real export: a candidate whose build breaks halfway leaves no file behind and no entry;
    the reference is still measured and recorded."""
    import shutil
    from dataclasses import replace

    from export import runtimes

    d = tmp_path / "export"
    shutil.copytree(pose_export.out_dir, d)
    result = replace(pose_export, out_dir=d, files=[], metadata=dict(pose_export.metadata), steps=[])

    def broken_build(runtime, result, metadata_json):
        (result.out_dir / "backbone.xml").write_text("half written")
        raise RuntimeError("the converter crashed\nwith a long trace")

    monkeypatch.setattr(runtimes, "build", broken_build)
    monkeypatch.setattr(runtimes, "measure", lambda calls, x, threads: {label: 1.0 for label in calls})  # not timed here
    lines: list[str] = []
    from contextlib import nullcontext

    recorded = runtimes.add_runtimes(result, ["openvino"], lambda what: nullcontext(), lines.append)
    assert [e.runtime for e in recorded] == ["torchscript"]
    assert "    runtime openvino left out: the converter crashed" in lines
    assert not (d / "backbone.xml").exists()
    assert json.loads((d / "metadata.json").read_text())["runtimes"][0]["runtime"] == "torchscript"


def test_torchscript_executor_optimisation_is_turned_off_on_cuda_only():
    """TorchScript's graph-executor optimisation compiles fusion kernels per input shape on CUDA (hundreds of ms per
    new shape, measured on an H200): a CUDA worker turns it off, a CPU worker leaves torch's default."""
    from handler.runtime.device import torchscript_executor

    before = torch._C._get_graph_executor_optimize()
    try:
        torch._C._set_graph_executor_optimize(True)
        torchscript_executor(torch.device("cpu"))
        assert torch._C._get_graph_executor_optimize() is True
        torchscript_executor(torch.device("cuda", 0))  # a device object only: no GPU is needed to decide
        assert torch._C._get_graph_executor_optimize() is False
    finally:
        torch._C._set_graph_executor_optimize(before)


def test_loading_an_export_sets_the_executor_for_its_device(pose_export, monkeypatch):
    from handler.runtime import artifacts

    seen = []
    monkeypatch.setattr(artifacts, "torchscript_executor", seen.append)
    artifacts.load_artifacts(pose_export.out_dir, torch.device("cpu"))
    assert seen == [torch.device("cpu")]
