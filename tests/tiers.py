"""The test tiers: which tests are slow, and the fast tier's guard against starting TorchServe.

``pytest -m "not slow"`` is the fast tier. What makes a test slow is declared where the cost is: the
``slow`` or ``integration`` marker on the test or its module, or :func:`slow_fixture` on a fixture that starts
TorchServe, exports or compiles a model (every test that uses it, directly or through another fixture, is
then slow). ``tests/conftest.py`` applies the rule; docs/architecture.md, "Tests", describes the tiers.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tools.server import NO_SERVER_ENV

SLOW_FIXTURES: set[str] = set()  # filled by @slow_fixture as the test modules are imported


def slow_fixture(*args, **kwargs):
    """``@pytest.fixture(...)`` for a fixture that starts TorchServe, exports or compiles a model: every test that
    uses it is marked slow."""

    def declare(fn):
        SLOW_FIXTURES.add(fn.__name__)
        return pytest.fixture(*args, **kwargs)(fn)

    if len(args) == 1 and callable(args[0]) and not kwargs:  # @slow_fixture without arguments
        fn, args = args[0], ()
        return declare(fn)
    return declare


def is_slow(item: pytest.Item) -> bool:
    return (
        item.get_closest_marker("slow") is not None
        or item.get_closest_marker("integration") is not None
        or bool(SLOW_FIXTURES & set(getattr(item, "fixturenames", ())))
    )


def _starts_torchserve(args) -> bool:
    """A ``torchserve --start`` command line (a list, or a string for ``shell=True``)."""
    words = args.split() if isinstance(args, str) else [str(a) for a in args] if isinstance(args, (list, tuple)) else [str(args)]
    return "--start" in words and any(Path(w).name == "torchserve" for w in words)


class _GuardedPopen(subprocess.Popen):
    def __init__(self, args, *rest, **kwargs):
        reason = os.environ.get(NO_SERVER_ENV)
        if reason and _starts_torchserve(args):
            raise RuntimeError(f"TorchServe may not start here: {reason}")
        super().__init__(args, *rest, **kwargs)


def guard_torchserve_starts() -> None:
    """Every ``torchserve --start`` of this process (``subprocess.Popen``, and ``subprocess.run`` through it) checks
    :data:`tools.server.NO_SERVER_ENV`; ``tools.server.start_server`` checks it in the commands a test runs."""
    subprocess.Popen = _GuardedPopen  # type: ignore[misc]


@contextmanager
def no_torchserve(fast_test: str | None) -> Iterator[None]:
    """While ``fast_test`` (a node id; None: a slow test) runs, with its fixtures, no TorchServe may start."""
    if fast_test is None:
        yield
        return
    os.environ[NO_SERVER_ENV] = (f"{fast_test} is in the fast tier (pytest -m \"not slow\"); a test that starts TorchServe "
                                 "is slow: mark it, its module or its fixture (tests/tiers.py slow_fixture)")
    try:
        yield
    finally:
        os.environ.pop(NO_SERVER_ENV, None)
