"""The fast tier (``pytest -m "not slow"``) cannot start TorchServe: this test is in it, so every way to start one
fails at once with a message that says how to mark the test slow (tests/tiers.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tools.server import REPO_ROOT, ServerError, start_server


def test_the_fast_tier_cannot_start_torchserve(tmp_path, request):
    assert request.node.get_closest_marker("slow") is None
    with pytest.raises(ServerError, match="fast tier"):
        start_server(tmp_path / "store", tmp_path / "work")
    assert not (tmp_path / "work").exists(), "refused before anything was written"
    with pytest.raises(RuntimeError, match="fast tier"):
        subprocess.Popen([str(tmp_path / "torchserve"), "--start", "--ncs"])
    # a command the test runs (a launcher, a demo) inherits the refusal
    code = f"from tools.server import start_server; start_server({str(tmp_path / 'store')!r}, {str(tmp_path / 'child')!r})"
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode != 0 and "fast tier" in child.stderr
    assert not (tmp_path / "child").exists()
