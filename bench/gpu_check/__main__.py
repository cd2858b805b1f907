"""``python -m bench.gpu_check``: every section in order, the JSON and the markdown rewritten after each (see the
package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from bench.gpu_check import JSON_FILE, MANIFEST_FILE, MD_FILE
from bench.gpu_check import __doc__ as PACKAGE_DOC
from bench.gpu_check.checks import (
    section_artifacts,
    section_environment,
    section_fp16,
    section_fp32,
    section_gpu_decode,
    section_letterbox,
    section_tests,
)
from bench.gpu_check.compiled import section_compiled
from bench.gpu_check.executor import fix_executor, section_executor
from bench.gpu_check.gpu_id import section_gpu_id
from bench.gpu_check.run import REPO, Run
from bench.gpu_check.throughput import section_batch_delay, section_overlap, section_throughput


def _section(run: Run, name: str, fn: Callable[[], dict], min_left: float = 20.0) -> None:
    if run.left() < min_left:
        run.results[name] = {"skipped": f"time budget ({run.left():.0f} s left)"}
    else:
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            run.results[name] = fn()
        except Exception as e:  # noqa: BLE001 - recorded, the next sections still run
            run.results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            run.results.setdefault("errors", []).append(name)
        run.results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        print(f"[gpu_check] {name} done in {run.results['seconds'][name]} s", flush=True)
    run.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=PACKAGE_DOC.split("\n\n")[0])
    ap.add_argument("--exports", type=Path, default=REPO / "exports" / "gpu_check", help="the folder bench.gpu_prepare wrote")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "exports" / "gpu_check_out"))
    ap.add_argument("--device", default="cuda:0", help="cuda:N, or cpu for the dry run")
    ap.add_argument("--batches", default=None, help="comma-separated (default 1,8,32,64; cpu: 1,2)")
    ap.add_argument("--quick", action="store_true", help="one warm-up and one timed call per measurement")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting sections after this many seconds")
    ap.add_argument("--pytest-k", default=None, help="pytest -k expression for the tests section")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--jit-optimize", choices=("on", "off"), default=None,
                    help="TorchScript's graph-executor optimisation in this process (default: what a worker does, off on CUDA); see executor.py")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.jit_optimize is not None:
        fix_executor(args.jit_optimize == "on")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here; run with --device cpu for the dry run", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 8, 32, 64] if device.type == "cuda" else [1, 2])
    manifest_path = args.exports / MANIFEST_FILE
    if not manifest_path.is_file():
        print(f"{manifest_path} not found: run `python -m bench.gpu_prepare` where Ultralytics is installed, and carry its folder",
              file=sys.stderr)
        return 2
    run = Run(args.exports, args.out, device, batches, args.quick, time.monotonic() + args.budget_s)
    run.manifest = json.loads(manifest_path.read_text())
    run.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    shutil.copytree(args.exports, run.work, dirs_exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    sections: list[tuple[str, Callable[[], dict]]] = [
        ("environment", lambda: section_environment(run)),
        ("artifacts", lambda: section_artifacts(run)),
        ("tests", lambda: section_tests(run, args.pytest_k)),
        ("letterbox", lambda: section_letterbox(run)),
        ("fp32", lambda: section_fp32(run)),
        ("fp16", lambda: section_fp16(run)),
        ("gpu_decode", lambda: section_gpu_decode(run)),
        ("executor", lambda: section_executor(run)),
        ("throughput", lambda: section_throughput(run)),
        ("gpu_id", lambda: section_gpu_id(run)),
        ("batch_delay", lambda: section_batch_delay(run)),
        ("compiled", lambda: section_compiled(run)),
        ("overlap", lambda: section_overlap(run)),
    ]
    try:
        for name, fn in sections:
            if name in skip:
                run.results[name] = {"skipped": "--skip"}
                continue
            _section(run, name, fn, min_left=0.0 if name in ("environment", "batch_delay") else 20.0)
    finally:
        shutil.rmtree(run.work, ignore_errors=True)
    print(f"[gpu_check] wrote {run.out / JSON_FILE} and {run.out / MD_FILE}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
