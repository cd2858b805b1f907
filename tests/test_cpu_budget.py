"""handler/runtime/cpu_budget.py: the CPUs a process may use (affinity, cgroup v1/v2 quota) and auto threads.

The quota tests build fake cgroup trees in ``tmp_path`` (a ``/proc/self/cgroup`` file and the
controller files the kernel would show) and point the function at them. The affinity tests pin a
real subprocess with ``os.sched_setaffinity`` and with ``taskset``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handler.runtime.cpu_budget import CpuBudget, auto_threads, cpu_budget, threads_per_worker, tightest_quota
from tools.server import REPO_ROOT


# Prints the budget a fresh process sees with the real /sys/fs/cgroup and /proc/self/cgroup.
_PRINT_BUDGET = """
import json, sys
sys.path.insert(0, sys.argv[1])
from handler.runtime.cpu_budget import affinity_cpus, auto_threads, cpu_budget
b = cpu_budget()
print(json.dumps({"affinity": affinity_cpus(), "cpus": b.cpus, "threads": auto_threads(1).threads, "reason": b.reason}))
"""


def _budget_in_subprocess(prefix: list[str] | None = None, preexec=None) -> dict:
    out = subprocess.run(
        [*(prefix or []), sys.executable, "-c", _PRINT_BUDGET, str(REPO_ROOT)],
        capture_output=True, text=True, timeout=60, preexec_fn=preexec, check=True,
    )
    return json.loads(out.stdout)


def _real_quota_cpus() -> float | None:
    quota = tightest_quota()
    return None if quota is None else quota.cpus


# ---------------------------------------------------------------- affinity (real processes)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_affinity_of_one_cpu_gives_one_cpu_and_one_thread():
    cpu = min(os.sched_getaffinity(0))
    seen = _budget_in_subprocess(preexec=lambda: os.sched_setaffinity(0, {cpu}))
    assert seen["affinity"] == 1 and seen["cpus"] == 1 and seen["threads"] == 1, seen
    assert "affinity 1 CPU" in seen["reason"]


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset is not installed")
def test_taskset_pins_the_budget():
    cpu = min(os.sched_getaffinity(0))
    seen = _budget_in_subprocess(["taskset", "-c", str(cpu)])
    assert (seen["affinity"], seen["cpus"], seen["threads"]) == (1, 1, 1), seen


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_unpinned_process_sees_its_whole_affinity_capped_by_the_real_quota():
    """The real machine: the child inherits our affinity; the host's cpu_count is not the answer by itself."""
    mine = len(os.sched_getaffinity(0))
    seen = _budget_in_subprocess()
    quota = _real_quota_cpus()
    expected = mine if quota is None else max(1, min(mine, int(quota)))
    assert seen["affinity"] == mine and seen["cpus"] == expected, seen


@pytest.fixture
def real_quota_cgroup():
    """A child cgroup of this machine's CPU controller with a 1.5-CPU quota (like ``docker --cpus 1.5``);
    skipped where this process may not create one. Removed afterwards."""
    from handler.runtime.cpu_budget import CGROUP_ROOT, PROC_SELF_CGROUP, find_cgroup_cpu

    try:
        cg = find_cgroup_cpu(CGROUP_ROOT, PROC_SELF_CGROUP)
    except OSError:
        cg = None
    if cg is None:
        pytest.skip("no cgroup CPU controller visible")
    child = cg.directory / f"yolo_cpu_budget_test_{os.getpid()}"
    try:
        child.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a cgroup here ({e})")
    try:
        try:
            if cg.version == 2:
                (child / "cpu.max").write_text("150000 100000")
            else:
                (child / "cpu.cfs_period_us").write_text("100000")
                (child / "cpu.cfs_quota_us").write_text("150000")
        except OSError as e:
            pytest.skip(f"cannot set a CPU quota ({e})")
        yield child
    finally:
        for _ in range(50):  # the child process may take a moment to leave
            try:
                child.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_a_real_cgroup_quota_caps_the_budget(real_quota_cgroup):
    """The kernel's own files: a process moved into a 1.5-CPU cgroup gets 1 CPU whatever its affinity."""
    procs = real_quota_cgroup / "cgroup.procs"
    seen = _budget_in_subprocess(preexec=lambda: procs.write_text(str(os.getpid())))
    assert seen["cpus"] == 1 and seen["threads"] == 1, seen
    assert "150000" in seen["reason"] and real_quota_cgroup.name in seen["reason"], seen["reason"]


# ---------------------------------------------------------------- fake cgroup trees


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_tree(tmp_path: Path, levels: dict[str, str | None], own: str = "/") -> tuple[Path, Path]:
    """A cgroup v2 mount: ``levels`` maps a cgroup path to its ``cpu.max`` text (None: no file)."""
    root = tmp_path / "sys_fs_cgroup"
    _write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    for path, cpu_max in levels.items():
        d = root / path.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        if cpu_max is not None:
            _write(d / "cpu.max", cpu_max)
    proc = tmp_path / "proc_self_cgroup"
    _write(proc, f"0::{own}\n")
    return root, proc


def v1_tree(
    tmp_path: Path, levels: dict[str, tuple[str, str] | None], own: str = "/", mount: str = "cpu,cpuacct"
) -> tuple[Path, Path]:
    """A cgroup v1 hierarchy: ``levels`` maps a path to ``(cfs_quota_us, cfs_period_us)`` texts."""
    root = tmp_path / "sys_fs_cgroup"
    (root / "memory").mkdir(parents=True)
    (root / "cpuset").mkdir()  # "cpuset" is not the cpu controller
    for path, files in levels.items():
        d = root / mount / path.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        if files is not None:
            _write(d / "cpu.cfs_quota_us", files[0])
            _write(d / "cpu.cfs_period_us", files[1])
    proc = tmp_path / "proc_self_cgroup"
    _write(proc, f"12:memory:{own}\n4:cpuset:/\n3:{mount}:{own}\n1:name=systemd:{own}\n0::/\n")
    return root, proc


@pytest.mark.parametrize(
    "cpu_max,affinity,expected",
    [
        ("150000 100000", 2, 1),  # 1.5 CPUs -> 1 (rounded down)
        ("200000 100000", 8, 2),  # quota below affinity
        ("800000 100000", 2, 2),  # quota above affinity: affinity wins
        ("50000 100000", 4, 1),  # half a CPU -> at least 1
        ("300000 50000", 16, 6),  # another period
        ("max 100000", 4, 4),  # no quota
    ],
)
def test_cgroup_v2_cpu_max_caps_the_affinity(tmp_path, cpu_max, affinity, expected):
    root, proc = v2_tree(tmp_path, {"/": cpu_max})
    b = cpu_budget(root, proc, affinity=affinity)
    assert b.cpus == expected and b.affinity == affinity
    if cpu_max.startswith("max"):
        assert b.quota is None and "no cgroup CPU quota" in b.reason
    else:
        assert b.quota is not None and f"cpu.max {cpu_max}" in b.reason
    assert b.reason.endswith(f"-> {expected} CPU{'s' if expected != 1 else ''}")


def test_cgroup_v2_the_tightest_level_on_the_path_wins(tmp_path):
    """A pod limit of 3 CPUs above a container limit of 1.5: the process gets 1."""
    root, proc = v2_tree(
        tmp_path,
        {"/kubepods": "max 100000", "/kubepods/pod1": "300000 100000", "/kubepods/pod1/ctr": "150000 100000"},
        own="/kubepods/pod1/ctr",
    )
    assert cpu_budget(root, proc, affinity=8).cpus == 1
    # and the other way round: the parent is the tighter one
    root2, proc2 = v2_tree(tmp_path / "b", {"/a": "200000 100000", "/a/b": "max 100000"}, own="/a/b")
    b = cpu_budget(root2, proc2, affinity=8)
    assert b.cpus == 2 and "/a)" in b.reason
    # both levels limited, the parent tighter than the process's own cgroup
    root3, proc3 = v2_tree(tmp_path / "c", {"/a": "100000 100000", "/a/b": "300000 100000"}, own="/a/b")
    assert cpu_budget(root3, proc3, affinity=8).cpus == 1


def test_cgroup_v2_own_path_not_visible_uses_the_mount(tmp_path):
    """Without a cgroup namespace /proc/self/cgroup shows the host's path; the mount is ours."""
    root, proc = v2_tree(tmp_path, {"/": "100000 100000"}, own="/system.slice/docker-abc.scope")
    assert cpu_budget(root, proc, affinity=4).cpus == 1


def test_cgroup_v2_hybrid_unified_mount(tmp_path):
    """cgroup v2 mounted at /sys/fs/cgroup/unified and no v1 cpu controller."""
    root = tmp_path / "cg"
    _write(root / "unified" / "cgroup.controllers", "cpu\n")
    _write(root / "unified" / "cpu.max", "200000 100000\n")
    proc = tmp_path / "proc"
    _write(proc, "0::/\n")
    assert cpu_budget(root, proc, affinity=4).cpus == 2


@pytest.mark.parametrize(
    "quota,period,affinity,expected",
    [("150000", "100000", 2, 1), ("200000", "100000", 8, 2), ("900000", "100000", 2, 2), ("-1", "100000", 3, 3)],
)
def test_cgroup_v1_cfs_quota_caps_the_affinity(tmp_path, quota, period, affinity, expected):
    root, proc = v1_tree(tmp_path, {"/": (quota, period)})
    b = cpu_budget(root, proc, affinity=affinity)
    assert b.cpus == expected
    assert ("cpu.cfs_quota_us" in b.reason) == (quota != "-1")


def test_cgroup_v1_nested_and_host_paths(tmp_path):
    # the process's own directory exists: walk up to the mount, tightest wins
    root, proc = v1_tree(
        tmp_path, {"/": ("-1", "100000"), "/kubepods/pod1": ("250000", "100000"), "/kubepods/pod1/ctr": ("-1", "100000")},
        own="/kubepods/pod1/ctr",
    )
    assert cpu_budget(root, proc, affinity=8).cpus == 2
    # inside a container: the host path is not visible, the mount root is the container's cgroup
    root2, proc2 = v1_tree(tmp_path / "c", {"/": ("100000", "100000")}, own="/kubepods/pod9/abc", mount="cpu")
    assert cpu_budget(root2, proc2, affinity=8).cpus == 1


def test_this_machines_layout_hybrid_v1_cpu_with_unified_v2(tmp_path):
    """This CI machine: v1 ``cpu`` next to a cgroup2 ``unified`` mount: the v1 cpu controller is the one."""
    root, proc = v1_tree(tmp_path, {"/": ("100000", "100000")}, mount="cpu")
    _write(root / "unified" / "cgroup.controllers", "")
    _write(root / "unified" / "cpu.max", "max 100000")
    assert cpu_budget(root, proc, affinity=2).cpus == 1


def test_no_quota_files_anywhere_is_no_quota(tmp_path):
    root, proc = v2_tree(tmp_path, {"/": None, "/a": None}, own="/a")
    b = cpu_budget(root, proc, affinity=3)
    assert (b.cpus, b.quota) == (3, None) and "no cgroup CPU quota" in b.reason


def test_missing_cgroup_root_and_missing_proc_file_fall_back_to_affinity(tmp_path, caplog):
    # no cgroup filesystem at all (a v2 line but no mount): no quota, nothing to warn about
    proc = tmp_path / "proc"
    _write(proc, "0::/\n")
    assert cpu_budget(tmp_path / "nothing", proc, affinity=2).cpus == 2
    # /proc/self/cgroup itself missing: affinity, with a warning that names the file
    with caplog.at_level(logging.WARNING, logger="handler.runtime.cpu_budget"):
        b = cpu_budget(tmp_path / "nothing", tmp_path / "no_such_proc_file", affinity=2)
    assert b.cpus == 2 and "unreadable" in b.reason
    assert "no_such_proc_file" in caplog.text


def test_v1_period_file_missing_falls_back_to_affinity(tmp_path, caplog):
    root, proc = v1_tree(tmp_path, {"/": ("150000", "100000")})
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").unlink()
    with caplog.at_level(logging.WARNING, logger="handler.runtime.cpu_budget"):
        b = cpu_budget(root, proc, affinity=2)
    assert b.cpus == 2 and b.quota is None
    assert "cpu.cfs_period_us" in caplog.text


@pytest.mark.parametrize(
    "cpu_max", ["", "garbage", "150000", "150000 100000 7", "-5 100000", "150000 0", "max abc", "1.5 100000", "\x00\xff"]
)
def test_garbage_cpu_max_falls_back_to_affinity_with_a_log_line(tmp_path, caplog, cpu_max):
    root, proc = v2_tree(tmp_path, {"/": cpu_max})
    with caplog.at_level(logging.WARNING, logger="handler.runtime.cpu_budget"):
        b = cpu_budget(root, proc, affinity=2)
    assert (b.cpus, b.quota) == (2, None)
    assert "cpu.max" in caplog.text and "using the CPU affinity alone" in caplog.text
    assert "unreadable" in b.reason


@pytest.mark.parametrize("quota,period", [("lots", "100000"), ("0", "100000"), ("150000", "-1"), ("150000", "")])
def test_garbage_v1_files_fall_back_to_affinity(tmp_path, caplog, quota, period):
    root, proc = v1_tree(tmp_path, {"/": (quota, period)})
    with caplog.at_level(logging.WARNING, logger="handler.runtime.cpu_budget"):
        assert cpu_budget(root, proc, affinity=3).cpus == 3
    assert "cpu.cfs_" in caplog.text


def test_unreadable_cpu_max_falls_back(tmp_path, caplog):
    """A directory where the file should be: reading raises OSError, which is caught."""
    root, proc = v2_tree(tmp_path, {"/": None})
    (root / "cpu.max").mkdir()
    with caplog.at_level(logging.WARNING, logger="handler.runtime.cpu_budget"):
        assert cpu_budget(root, proc, affinity=2).cpus == 2
    assert "cpu.max" in caplog.text


def test_garbage_proc_self_cgroup_lines_are_skipped(tmp_path):
    root, _ = v2_tree(tmp_path, {"/": "100000 100000"})
    proc = tmp_path / "proc2"
    _write(proc, "not a cgroup line\n\n0::/\n")
    assert cpu_budget(root, proc, affinity=4).cpus == 1


# ---------------------------------------------------------------- the division among workers


@pytest.mark.parametrize("cpus,workers,expected", [(8, 1, 8), (8, 3, 2), (8, 16, 1), (1, 1, 1), (2, 4, 1), (6, 0, 6)])
def test_threads_per_worker(cpus, workers, expected):
    assert threads_per_worker(cpus, workers) == expected


def test_auto_threads_divides_the_budget_and_says_why(tmp_path):
    root, proc = v2_tree(tmp_path, {"/": "400000 100000"})
    budget = cpu_budget(root, proc, affinity=64)  # a 4-CPU limit on a 64-core node
    choice = auto_threads(2, budget)
    assert (choice.threads, choice.workers, choice.budget.cpus) == (2, 2, 4)
    assert choice.reason == (
        f"affinity 64 CPUs, cgroup v2 cpu.max 400000 100000 ({root}) -> 4 CPUs / 2 workers -> 2 threads"
    )


def test_auto_threads_without_a_budget_measures_this_process(monkeypatch):
    monkeypatch.setattr("handler.runtime.cpu_budget.cpu_budget", lambda: CpuBudget(6, 6, None, "test budget -> 6 CPUs"))
    choice = auto_threads(4)
    assert choice.threads == 1 and choice.reason == "test budget -> 6 CPUs / 4 workers -> 1 thread"
