"""One run of the GPU check: its settings, what it found so far, and timing on the device."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bench.gpu_check import JSON_FILE, MD_FILE
from bench.gpu_check.summary import summary
from bench.stats import median

REPO = Path(__file__).resolve().parents[2]



@dataclass
class Run:
    """One run's settings, where it writes, and what it found so far."""

    exports: Path  # the carried folder (read only)
    out: Path
    device: torch.device
    batches: list[int]
    quick: bool
    deadline: float  # time.monotonic() after which sections are skipped
    work: Path = Path()  # a writable copy of the exports (re-scripted files go here)
    manifest: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def model_dirs(self) -> dict[str, Path]:
        return {name: self.work / m["dir"] for name, m in self.manifest["models"].items()}

    def images(self) -> dict[str, bytes]:
        return {name: (self.work / "images" / name).read_bytes() for name in self.manifest["images"]}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (JSON_FILE + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        tmp.replace(self.out / JSON_FILE)
        (self.out / MD_FILE).write_text(summary(self.results))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def timed(fn: Callable[[], Any], device: torch.device, warm: int, min_iters: int, min_s: float, max_iters: int = 200) -> list[float]:
    """Milliseconds of each timed call of ``fn`` (device synchronised around it), after ``warm`` calls."""
    for _ in range(warm):
        fn()
    sync(device)
    ms: list[float] = []
    start = time.perf_counter()
    while len(ms) < max_iters and (len(ms) < min_iters or time.perf_counter() - start < min_s):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ms.append((time.perf_counter() - t0) * 1000)
    return ms


def median_ms(values: list[float]) -> float:
    return round(median(values), 3)


