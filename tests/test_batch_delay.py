"""The batch delay the archive ships (issue 19): per device, from the measured curve, and a user's value wins."""

from __future__ import annotations

import shutil

import yaml

from export.archive import BATCH_DELAY_MS, build_archive, model_config_yaml


def test_the_default_delay_follows_the_device():
    cpu, gpu = (yaml.safe_load(model_config_yaml(device=d))["maxBatchDelay"] for d in ("cpu", "gpu"))
    assert (cpu, gpu) == (BATCH_DELAY_MS["cpu"], BATCH_DELAY_MS["gpu"])
    assert 0 < cpu < gpu  # 0 makes TorchServe poll its queue; a GPU batch is worth a longer wait
    assert yaml.safe_load(model_config_yaml(max_batch_delay_ms=7))["maxBatchDelay"] == 7


def test_a_users_value_in_model_config_wins(pose_export, tmp_path):
    export_dir = tmp_path / "export"
    shutil.copytree(pose_export.out_dir, export_dir, ignore=shutil.ignore_patterns("code"))
    (export_dir / "model-config.yaml").write_text("maxBatchDelay: 9\nbatchSize: 8\nhandler:\n  conf: 0.4\n")
    build_archive(export_dir, "yolo", tmp_path / "store", keep_user_config=True, device="gpu")
    written = yaml.safe_load((export_dir / "model-config.yaml").read_text())
    assert (written["maxBatchDelay"], written["batchSize"], written["handler"]["conf"]) == (9, 8, 0.4)
    build_archive(export_dir, "yolo", tmp_path / "store", device="gpu")  # not keeping: the device default
    assert yaml.safe_load((export_dir / "model-config.yaml").read_text())["maxBatchDelay"] == BATCH_DELAY_MS["gpu"]


def test_the_report_renders_both_passes():
    from bench.batch_delay import to_markdown

    run = {"c1": {"bus.jpg": {"S_p50": 90.0, "L1_p50": 80.0, "S/L1": 1.125, "handler_ms": {"preprocess": 5, "inference": 70, "postprocess": 1}}},
           "queue_ms_per_request_c1": 2.5, "load": {"4": {"images_per_s": 12.0, "p50": 300.0}}}
    text = to_markdown({"delays": {"2": [run, run]}, "layouts": {"1w x 2t": [run]}, "layout_delay": 2}, [1, 4])
    assert "| 2 | 90.0 / 90.0 |" in text and "1.12 / 1.12" in text and "12.0 / 12.0" in text and "| 1w x 2t |" in text
