"""Versioned rollout and rollback (issue 14): the archive checks without a server, then a real
TorchServe under load through a good rollout, a broken archive and a rollback, with zero failed requests."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from handler.contract import CONTRACT_VERSION, archive_file_name
from tools.rollout import Archive, RolloutError, check_archive


def _archive(task="pose", contract=CONTRACT_VERSION, version="2.0") -> Archive:
    return Archive(Path(f"yolo-{version}.mar"), "yolo", version, {"contract": contract, "task": task, "names": ["person"]})


def test_archive_checks_refuse_what_would_break_clients():
    check_archive(_archive(), "pose", ["1.0"], allow_task_change=False)  # a good one passes
    with pytest.raises(RolloutError, match=f"contract version 1, this handler reads {CONTRACT_VERSION}"):
        check_archive(_archive(contract=1), "pose", ["1.0"], False)
    with pytest.raises(RolloutError, match="is a detect model, the serving version is pose.*--allow-task-change"):
        check_archive(_archive(task="detect"), "pose", ["1.0"], False)
    check_archive(_archive(task="detect"), "pose", ["1.0"], allow_task_change=True)
    with pytest.raises(RolloutError, match="version 2.0 of 'yolo' is already registered"):
        check_archive(_archive(), "pose", ["1.0", "2.0"], False)


def test_archive_is_read_from_the_mar_without_loading_it(tmp_path):
    mar = tmp_path / "yolo-2.0.mar"
    with zipfile.ZipFile(mar, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "yolo", "modelVersion": "2.0"}}))
        z.writestr("metadata.json", json.dumps({"contract": CONTRACT_VERSION, "task": "pose"}))
    a = Archive.read(mar)
    assert (a.name, a.version, a.metadata["task"]) == ("yolo", "2.0", "pose")
    (tmp_path / "junk.mar").write_bytes(b"not a zip")
    with pytest.raises(RolloutError, match="not a model archive"):
        Archive.read(tmp_path / "junk.mar")
    with pytest.raises(RolloutError, match="not found"):
        Archive.read(tmp_path / "missing.mar")


def test_version_file_names():
    assert archive_file_name("yolo", "1.0") == "yolo.mar" and archive_file_name("yolo", "2.0") == "yolo-2.0.mar"


def test_each_version_exports_into_its_own_folder():
    """1.0 and 2.0 never share an export folder, so rerunning the archiver for 1.0 packs 1.0's files."""
    from export.__main__ import parse_args

    assert parse_args(["--weights", "w.pt"]).out == Path("exports/yolo")
    assert parse_args(["--weights", "w.pt", "--version", "2.0"]).out == Path("exports/yolo-2.0")
    assert parse_args(["--weights", "w.pt", "--name", "cars", "--version", "2.0"]).out == Path("exports/cars-2.0")
    assert parse_args(["--weights", "w.pt", "--version", "2.0", "--out", "mine"]).out == Path("mine")


@pytest.mark.slow
@pytest.mark.integration
def test_rollout_under_load_loses_nothing(tmp_path, pose_weights):
    """The CI version of ``python -m bench.rollout_load``: 4 clients the whole time; roll out 2.0 (keeping
    1.0), try an archive with a corrupt backbone.pt, roll back to 1.0. Every request gets 200; answers
    switch from 1.0 to 2.0 after the rollout and back after the rollback; the broken archive never answers."""
    from bench.rollout_load import run

    report = run(tmp_path, str(pose_weights), concurrency=4, broken=["corrupt"], before_s=6, between_s=4, after_s=6, log=print)
    assert [s["ok"] for s in report.steps] == [True, True, True], report.steps
    assert "died while loading" in report.steps[1]["message"], report.steps[1]  # detected in seconds, not at the timeout
    assert report.steps[1]["end"] - report.steps[1]["start"] < 60, report.steps[1]
    assert report.sent >= 100, report.sent
    assert report.failed == 0, report.statuses
    versions_seen = [v for row in report.version_share for v in row if v not in ("t0", "t1", "n")]
    assert set(versions_seen) == {"1.0", "2.0"}, report.version_share  # the corrupt 3.0 never answered
    first, last = report.version_share[0], [r for r in report.version_share if r["n"]][-1]
    assert first.get("1.0") == 1.0 and last.get("1.0") == 1.0, (first, last)
    assert any(row.get("2.0") == 1.0 for row in report.version_share), report.version_share
