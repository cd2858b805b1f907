"""examples/cpp: the exported pair run by LibTorch alone (no Python) gives the Python handler's detections.

The program is built once per session with CMake against the libtorch inside the installed torch wheel
(about 20 s of compiling on an idle 2-core machine). Skipped, with the reason, where cmake or a C++
compiler is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.utils

from handler.image.decode import decode_image
from handler.image.letterbox import letterbox
from handler.pipeline import YoloPipeline
from handler.service import YoloService
from handler.tasks.detect import Thresholds
from tools.server import REPO_ROOT

pytestmark = pytest.mark.slow  # builds the C++ example with CMake

CPP_DIR = REPO_ROOT / "examples" / "cpp"
TOL = 1e-4  # boxes, scores, keypoints: C++ vs the Python pipeline on the same pixels


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="session")
def cpp_binary(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: cannot build examples/cpp")
    if _compiler() is None:
        pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX): cannot build examples/cpp")
    build = tmp_path_factory.mktemp("cpp_build")
    configure = ["cmake", "-S", str(CPP_DIR), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    binary = build / "yolo_infer"
    assert binary.is_file(), f"the build did not produce {binary}"
    return binary


def write_ppm(path: Path, bgr: np.ndarray) -> Path:
    """``uint8[H, W, 3]`` BGR -> binary PPM (RGB), the C++ program's input."""
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    path.write_bytes(f"P6\n{bgr.shape[1]} {bgr.shape[0]}\n255\n".encode() + rgb.tobytes())
    return path


def read_ppm(path: Path) -> np.ndarray:
    """Binary PPM as written by ``yolo_infer --letterbox-only`` -> ``uint8[H, W, 3]`` BGR."""
    data = path.read_bytes()
    magic, w, h, maxval, pixels = data.split(maxsplit=4)
    assert (magic, maxval) == (b"P6", b"255"), data[:20]
    rgb = np.frombuffer(pixels, np.uint8).reshape(int(h), int(w), 3)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def run_cpp(binary: Path, export_dir: Path, ppm: Path, *args: str) -> dict:
    """Run ``yolo_infer`` with this process's torch thread count: oneDNN splits a convolution's sums by
    thread, so other counts move the outputs by ~1e-4 (in Python as much as in C++)."""
    threads = str(torch.get_num_threads())
    proc = subprocess.run(
        [str(binary), str(export_dir / "backbone.pt"), str(export_dir / "postprocess.pt"), str(ppm), "--threads", threads, *args],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"yolo_infer failed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout)


def rows_of(body: dict, nkpt: int) -> np.ndarray:
    """Response detections -> ``float64[n, 6 + 3 * nkpt]`` rows (x1, y1, x2, y2, score, class, (kx, ky, kv)*)."""
    rows = [
        [*d["box"], d["score"], d["class_id"], *(np.asarray(d.get("keypoints", []), float).ravel())]
        for d in body["detections"]
    ]
    return np.asarray(rows, float).reshape(-1, 6 + 3 * nkpt)


@pytest.mark.parametrize("hw", [(1080, 810), (720, 1280), (1280, 1280), (100, 37), (1, 50), (50, 1), (481, 640), (640, 480)])
def test_cpp_letterbox_is_bit_exact(cpp_binary, pose_export, tmp_path, hw):
    """The C++ letterbox (torch ops) equals handler/image/letterbox.py (cv2.INTER_LINEAR) pixel for pixel."""
    image = np.random.default_rng(hw[0] * 7919 + hw[1]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    meta = pose_export.metadata
    expected, _ = letterbox(image, meta["imgsz"], meta["max_stride"], meta["letterbox"])
    out = tmp_path / "letterboxed.ppm"
    proc = subprocess.run(
        [str(cpp_binary), "unused.pt", str(pose_export.out_dir / "postprocess.pt"), str(write_ppm(tmp_path / "in.ppm", image)),
         "--letterbox-only", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = read_ppm(out)
    assert got.shape == expected.shape
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() == 0, f"{int((diff > 0).sum())} values differ (max {diff.max()}) at {np.argwhere(diff > 0)[:3].tolist()}"


@pytest.mark.parametrize("th", [Thresholds(), Thresholds(conf=0.5, iou=0.5, max_det=3)], ids=["defaults", "conf.5-iou.5-max3"])
def test_cpp_detections_equal_python_pipeline(cpp_binary, pose_export, sample_images, tmp_path, th):
    pipeline = YoloPipeline.from_dir(pose_export.out_dir)
    service = YoloService(pipeline)
    nkpt = service.info.nkpt
    args = ["--conf", str(th.conf), "--iou", str(th.iou), "--max-det", str(th.max_det)]
    for path in sample_images:
        image = decode_image(path.read_bytes())
        ppm = write_ppm(tmp_path / f"{path.stem}.ppm", image)
        expected = pipeline.infer([pipeline.prepare(image, th)])[0][0].rows.numpy().astype(np.float64)
        assert len(expected) > 0, f"no detections on {path.name}: the comparison would prove nothing"

        precise = rows_of(run_cpp(cpp_binary, pose_export.out_dir, ppm, *args, "--precise"), nkpt)
        assert precise.shape == expected.shape, f"{path.name}: C++ {len(precise)} detections, Python {len(expected)}"
        assert np.array_equal(precise[:, 5], expected[:, 5]), f"{path.name}: class ids differ"
        worst = np.abs(precise - expected).max()
        assert worst <= TOL, f"{path.name}: C++ differs from the Python pipeline by {worst:.2e} > {TOL}"

        # the default output is the handler's JSON body: same keys and values at the response's precision
        body = run_cpp(cpp_binary, pose_export.out_dir, ppm, *args)
        answer = service.predict(path.read_bytes(), conf=th.conf, iou=th.iou, max_det=th.max_det)  # the handler's path
        assert answer.status == 200, answer.body
        reference = answer.body
        assert set(body["speed_ms"]) == {"preprocess", "inference", "postprocess"}
        body.pop("speed_ms"), reference.pop("speed_ms")
        assert {k: v for k, v in body.items() if k != "detections"} == {k: v for k, v in reference.items() if k != "detections"}
        assert [sorted(d) for d in body["detections"]] == [sorted(d) for d in reference["detections"]]
        assert [d["class_name"] for d in body["detections"]] == [d["class_name"] for d in reference["detections"]]
        rounded = np.abs(rows_of(body, nkpt) - rows_of(reference, nkpt)).max()
        assert rounded <= 0.01 + 1e-9, f"{path.name}: rounded C++ output differs from the handler's by {rounded}"


def test_cpp_rejects_bad_input(cpp_binary, pose_export, tmp_path):
    bad = tmp_path / "bad.ppm"
    bad.write_bytes(b"P5\n2 2\n255\n\x00\x00\x00\x00")  # grayscale PPM: not accepted
    proc = subprocess.run(
        [str(cpp_binary), str(pose_export.out_dir / "backbone.pt"), str(pose_export.out_dir / "postprocess.pt"), str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1 and "P6" in proc.stderr, proc.stderr
    proc = subprocess.run([str(cpp_binary), "--conf", "2", "a", "b", "c"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr, proc.stderr
