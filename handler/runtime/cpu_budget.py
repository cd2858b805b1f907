"""How many CPUs this process may really use, and how many torch threads each worker gets.

``os.cpu_count()`` is the host's count. A process may use fewer CPUs:

- its **CPU affinity** (``taskset``, a cpuset, Kubernetes' static CPU manager): ``os.sched_getaffinity(0)``;
- its **cgroup CPU quota** (``docker --cpus``, a Kubernetes CPU limit): cgroup v2 ``cpu.max``
  (``"QUOTA PERIOD"`` or ``"max PERIOD"``), cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
  (quota ``-1`` = none). A quota of 150000 per 100000 µs is 1.5 CPUs of time per period, whatever
  the affinity says.

:func:`cpu_budget` takes the affinity, caps it by the tightest quota on the path from the process's
cgroup (``/proc/self/cgroup``) up to the cgroup root, rounds down and never goes below 1.
:func:`auto_threads` divides that among the model's workers: it is what ``torch_threads: 0`` (auto)
means on CPU. Both return a value with a human-readable ``reason`` for the worker's log.

A cgroup file that cannot be read or parsed never fails the worker: the quota is ignored (the
affinity is used), and a warning names the file.

Paths are arguments (``cgroup_root``, ``proc_cgroup``) so tests can point them at a fake tree.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")

CGROUP_V2_CPU_MAX = "cpu.max"
CGROUP_V1_QUOTA = "cpu.cfs_quota_us"
CGROUP_V1_PERIOD = "cpu.cfs_period_us"


class CgroupFileError(ValueError):
    """A cgroup file exists but cannot be read or does not hold what the kernel writes there."""


@dataclass(frozen=True)
class CpuQuota:
    """A CFS bandwidth limit: ``quota_us`` of CPU time per ``period_us`` (``quota / period`` CPUs)."""

    quota_us: int
    period_us: int
    source: str  # "cgroup v2 cpu.max 150000 100000 (/sys/fs/cgroup)" — for the log

    @property
    def cpus(self) -> float:
        return self.quota_us / self.period_us


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may use: ``cpus >= 1`` and why (affinity, quota)."""

    cpus: int
    affinity: int
    quota: CpuQuota | None
    reason: str  # "affinity 2 CPUs, cgroup v2 cpu.max 150000 100000 (/sys/fs/cgroup) -> 1 CPU"


@dataclass(frozen=True)
class ThreadChoice:
    """``torch.set_num_threads(threads)`` for one worker, and why."""

    threads: int
    workers: int
    budget: CpuBudget
    reason: str  # "affinity 2 CPUs, no cgroup CPU quota -> 2 CPUs / 1 worker -> 2 threads"


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``os.cpu_count()`` where the platform has no affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as e:
        raise CgroupFileError(f"{path}: {e.strerror or e}") from None


def _positive_int(text: str, path: Path) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CgroupFileError(f"{path}: {text!r} is not an integer") from None
    if value <= 0:
        raise CgroupFileError(f"{path}: {value} is not positive")
    return value


def read_cpu_max(path: Path) -> CpuQuota | None:
    """cgroup v2 ``cpu.max``: ``"150000 100000"`` -> quota; ``"max 100000"`` -> None (no quota)."""
    text = _read(path)
    fields = text.split()
    if len(fields) != 2:
        raise CgroupFileError(f"{path}: {text!r} is not 'QUOTA PERIOD' or 'max PERIOD'")
    period = _positive_int(fields[1], path)
    if fields[0] == "max":
        return None
    quota = _positive_int(fields[0], path)
    return CpuQuota(quota, period, f"cgroup v2 cpu.max {quota} {period} ({path.parent})")


def read_cfs_quota(directory: Path) -> CpuQuota | None:
    """cgroup v1 ``cpu.cfs_quota_us`` (``-1`` = no quota) and ``cpu.cfs_period_us`` in ``directory``."""
    quota_path = directory / CGROUP_V1_QUOTA
    text = _read(quota_path)
    try:
        quota = int(text)
    except ValueError:
        raise CgroupFileError(f"{quota_path}: {text!r} is not an integer") from None
    if quota == -1:
        return None
    if quota <= 0:
        raise CgroupFileError(f"{quota_path}: {quota} is neither -1 nor positive")
    period_path = directory / CGROUP_V1_PERIOD
    period = _positive_int(_read(period_path), period_path)
    return CpuQuota(quota, period, f"cgroup v1 cpu.cfs_quota_us {quota} / cpu.cfs_period_us {period} ({directory})")


@dataclass(frozen=True)
class _CgroupCpu:
    """Where this process's CPU controller lives: the hierarchy's mount and the process's directory in it."""

    version: int  # 1 or 2
    mount: Path  # /sys/fs/cgroup (v2), /sys/fs/cgroup/cpu,cpuacct (v1)
    directory: Path  # the process's own cgroup under ``mount`` (``mount`` when its path is not visible)


def _inside(mount: Path, cgroup_path: str) -> Path:
    """``mount/cgroup_path`` when that directory exists, else ``mount``.

    In a container with its own cgroup namespace the path is ``/``; with cgroup v1, or v2 without a
    namespace, ``/proc/self/cgroup`` shows the host's path while the container's mount is already the
    container's cgroup, so the joined path does not exist and the mount itself is the right directory.
    """
    candidate = mount / cgroup_path.lstrip("/")
    return candidate if candidate.is_dir() else mount


def find_cgroup_cpu(cgroup_root: Path, proc_cgroup: Path) -> _CgroupCpu | None:
    """The CPU controller's hierarchy from ``/proc/self/cgroup`` lines ``ID:CONTROLLERS:PATH``.

    A v1 line whose controllers include ``cpu`` wins (in hybrid mode the cpu controller is bound to
    v1); otherwise the v2 line ``0::PATH``, mounted at ``cgroup_root`` (or ``cgroup_root/unified``).
    """
    v2_path = None
    for line in _read(proc_cgroup).splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and parts[0] == "0":
            v2_path = path
        elif "cpu" in controllers.split(","):
            mounts = sorted(p for p in cgroup_root.glob("*cpu*") if "cpu" in p.name.split(",") and p.is_dir())
            if mounts:
                return _CgroupCpu(1, mounts[0], _inside(mounts[0], path))
    if v2_path is not None:
        for mount in (cgroup_root, cgroup_root / "unified"):
            if (mount / "cgroup.controllers").is_file():
                return _CgroupCpu(2, mount, _inside(mount, v2_path))
    return None


def _levels(cg: _CgroupCpu) -> list[Path]:
    """The process's cgroup directory and each parent up to (and including) the mount."""
    levels = [cg.directory]
    while levels[-1] != cg.mount and cg.mount in levels[-1].parents:
        levels.append(levels[-1].parent)
    return levels


def tightest_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> CpuQuota | None:
    """The smallest CPU quota on the path from this process's cgroup to the root; None when there is none.

    A level without the file has no limit of its own (the root never has one). Raises
    :class:`CgroupFileError` when a file is there but unreadable or malformed.
    """
    cg = find_cgroup_cpu(Path(cgroup_root), Path(proc_cgroup))
    if cg is None:
        return None
    quotas = []
    for level in _levels(cg):
        if cg.version == 2:
            quota = read_cpu_max(level / CGROUP_V2_CPU_MAX) if (level / CGROUP_V2_CPU_MAX).exists() else None
        else:
            quota = read_cfs_quota(level) if (level / CGROUP_V1_QUOTA).exists() else None
        if quota is not None:
            quotas.append(quota)
    return min(quotas, key=lambda q: q.cpus, default=None)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _cpus(n: int) -> str:
    return _count(n, "CPU")


def cpu_budget(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP, affinity: int | None = None
) -> CpuBudget:
    """The CPUs this process may use: affinity, capped by the cgroup quota, rounded down, at least 1.

    ``affinity`` overrides :func:`affinity_cpus` (tests). Never raises for a bad cgroup file: it
    logs a warning and uses the affinity alone.
    """
    cpus = affinity_cpus() if affinity is None else max(1, int(affinity))
    head = f"affinity {_cpus(cpus)}"
    try:
        quota = tightest_quota(cgroup_root, proc_cgroup)
    except CgroupFileError as e:
        logger.warning("cannot read the cgroup CPU quota (%s); using the CPU affinity alone", e)
        return CpuBudget(cpus, cpus, None, f"{head}, cgroup quota unreadable ({e}) -> {_cpus(cpus)}")
    if quota is None:
        return CpuBudget(cpus, cpus, None, f"{head}, no cgroup CPU quota -> {_cpus(cpus)}")
    capped = max(1, min(cpus, math.floor(quota.cpus)))
    return CpuBudget(capped, cpus, quota, f"{head}, {quota.source} -> {_cpus(capped)}")


def threads_per_worker(cpus: int, workers: int) -> int:
    """The division policy: each worker's share of ``cpus`` CPUs, rounded down, at least 1.

    Measured served on 2 idle cores (docs/measurements/batch-delay.md, "Threads and workers on 2 cores"):
    one worker with this share (2 threads) beat one worker of 1 thread at every concurrency, 65-72 against
    100-106 ms for a lone request and 16-19 against 10-12 images/s under load, so the Java frontend and the
    client need no core of their own; two workers of 1 thread each (this share again) had the most
    throughput. A busy host, where 2 threads collapse, is the user's call (``torch_threads: 1``): a
    worker cannot tell another tenant's load from its own.
    """
    return max(1, cpus // max(1, workers))


def auto_threads(workers: int, budget: CpuBudget | None = None) -> ThreadChoice:
    """``torch_threads: 0`` on CPU: :func:`cpu_budget` divided among ``workers`` (``maxWorkers``)."""
    workers = max(1, int(workers))
    budget = cpu_budget() if budget is None else budget
    threads = threads_per_worker(budget.cpus, workers)
    reason = f"{budget.reason} / {_count(workers, 'worker')} -> {_count(threads, 'thread')}"
    return ThreadChoice(threads, workers, budget, reason)
