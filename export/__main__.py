"""``python -m export``: Ultralytics checkpoint -> TorchScript backbone + postprocessor (+ .mar)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from export.archive import BATCH_DELAY_MS
from handler.contract import DEFAULT_MODEL_VERSION

EXIT_USAGE = 2  # bad input: missing file, not a checkpoint, unsupported task
EXIT_MISMATCH = 1  # the export does not reproduce Ultralytics
PICKLE_WARNING = (
    "warning: loading an Ultralytics .pt checkpoint runs Python pickle (torch.load with weights_only=False), "
    "which can execute any code inside the file. Export only weights you trust. "
    "(Serving never unpickles: the worker loads the exported TorchScript files only.)"
)


def will_unpickle(weights: str) -> bool:
    """True when ``weights`` is an existing ``.pt`` file, which loading runs through pickle (a YAML, an
    image, a missing file or a folder is refused before anything is unpickled)."""
    path = Path(weights)
    return path.suffix.lower() == ".pt" and path.is_file()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="yolo-ts-export",
        description="Export an Ultralytics model (YOLO detect, pose, segment, OBB, classify, semantic, depth; RT-DETR) to a traced backbone (backbone.pt), a scripted "
        "postprocessor (postprocess.pt) and metadata.json, then check them against Ultralytics itself.",
    )
    p.add_argument("--weights", required=True, help="Ultralytics .pt checkpoint, or a model .yaml such as yolo26n-pose.yaml (random weights, seeded)")
    p.add_argument("--imgsz", type=int, nargs="+", default=None, metavar="N", help="letterbox target (classify: resize + crop size), N or H W; rounded up to the max stride (default: the checkpoint's training size, as YOLO.predict uses; 640 for a .yaml build)")
    p.add_argument("--name", default="yolo", help="model name: the .mar name and the URL /predictions/NAME (default yolo)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default exports/NAME, or exports/NAME-VERSION for a --version other than 1.0)")
    p.add_argument(
        "--head",
        choices=("auto", "one2many", "one2one"),
        default="auto",
        help="detection head of models that have two (YOLO26): auto follows the checkpoint, as YOLO(weights).predict() "
        "does; one2one is the NMS-free top-k head (predict(nms=False)); one2many is the NMS head",
    )
    p.add_argument("--letterbox", choices=("rect", "square"), default="rect", help="default letterbox of the served model: rect pads to the next stride multiple, as YOLO.predict (default); square pads to imgsz")
    p.add_argument(
        "--format",
        choices=("torchscript", "aoti"),
        default="torchscript",
        help="backbone format: torchscript (backbone.pt, default) or aoti (also backbone.pt2: torch.export + AOTInductor, "
        "compiled for this machine's CPU; the handler serves whichever the metadata names)",
    )
    p.add_argument("--runtimes", nargs="+", choices=("auto", "torchscript", "aoti", "openvino"), default=["auto"],
                   help="backbone runtimes to build beside backbone.pt, prove against Ultralytics and measure; the worker's "
                   "`runtime: auto` takes the fastest proven one that runs on its CPU. auto (default): each installed one "
                   "(aoti: AOTInductor with freezing, for this machine's CPU; openvino: needs the [openvino] extra); "
                   "torchscript: backbone.pt alone (docs/cpu-speed.md)")
    p.add_argument("--quantize", choices=("int8", "bf16"), default=None, help="reduced precision, NOT equal to Ultralytics "
                   "(every answer says \"precision\"; docs/cpu-speed.md): int8 quantises the backbone calibrated on --calib "
                   "(--int8-engine); bf16 runs it through OpenVINO in BF16 (needs a CPU with avx512_bf16 or amx_bf16). Both "
                   "report the drift against FP32 on the calibration and held-out images and refuse below 0.95 recall")
    p.add_argument("--int8-engine", choices=("openvino", "torchao"), default="openvino", help="--quantize int8 through "
                   "OpenVINO + NNCF (backbone.xml, default: the faster here) or torchao PT2E + AOTInductor (backbone.pt2)")
    p.add_argument("--calib", type=Path, default=None, metavar="DIR", help="calibration images for --quantize (undecodable files are skipped and counted)")
    p.add_argument("--accept-drift", "--accept-int8-drift", dest="accept_drift", action="store_true",
                   help="keep the reduced-precision backbone even if it keeps < 95%% of the FP32 detections")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with Ultralytics (not recommended)")
    p.add_argument("--seed", type=int, default=0, help="seed for building a .yaml model (default 0)")
    p.add_argument("--archive", action="store_true", help="also build MODEL_STORE/NAME.mar with torch-model-archiver")
    p.add_argument("--version", default="1.0", help="model version, recorded in metadata.json and the archive; "
                   "other than 1.0 the archive is MODEL_STORE/NAME-VERSION.mar, ready for `python -m tools.rollout` (default 1.0)")
    p.add_argument("--model-store", type=Path, default=Path("model_store"), help="where --archive writes the .mar (default model_store)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="what the archive will be served on: sets the "
                   "default maxBatchDelay (" + ", ".join(f"{d} {ms} ms" for d, ms in BATCH_DELAY_MS.items())
                   + "; a value in your model-config.yaml wins); auto: gpu when CUDA is available here")
    args = p.parse_args(argv)
    if args.imgsz is not None:
        if len(args.imgsz) not in (1, 2) or min(args.imgsz) < 1:
            p.error("--imgsz takes one or two positive integers")
        args.imgsz = args.imgsz * 2 if len(args.imgsz) == 1 else args.imgsz
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.version):
        p.error(f"--version {args.version!r}: use letters, digits, '.', '_' or '-' (e.g. 2.0); it becomes part of a file name and a URL")
    if args.calib is not None and args.quantize is None:
        p.error("--calib is for --quantize int8 or bf16")
    if args.out is None:  # each version its own folder: rerunning the archiver for 1.0 never packs 2.0's files
        args.out = Path("exports") / (args.name if args.version == DEFAULT_MODEL_VERSION else f"{args.name}-{args.version}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from export.checkpoint import ExportError
    from export.exporter import export_model
    from export.quantize import Int8DriftError
    from export.verify import VerificationError

    if will_unpickle(args.weights):
        print(PICKLE_WARNING, file=sys.stderr)
    t0 = time.perf_counter()
    try:
        if args.quantize is not None:
            from export.quantize import export_reduced

            result = export_reduced(
                args.quantize, args.int8_engine, args.weights, args.out, args.calib, args.imgsz, args.accept_drift,
                name=args.name, head=args.head, letterbox=args.letterbox, check=not args.no_check, seed=args.seed,
                version=args.version,
            ).export
        else:
            from export.runtimes import resolve

            result = export_model(
                args.weights, args.out, args.imgsz, args.name, args.head, args.letterbox, not args.no_check, args.seed,
                backbone_format=args.format, version=args.version, runtimes=resolve(args.runtimes),
            )
        if args.archive:
            from export.archive import build_archive

            import torch

            device = args.device if args.device != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
            mar = build_archive(result.out_dir, args.name, args.model_store, keep_user_config=True, device=device)
            result.files.append(mar)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Int8DriftError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_MISMATCH
    except VerificationError as e:
        print(f"error: export does not match Ultralytics: {e}", file=sys.stderr)
        return EXIT_MISMATCH
    print("wrote:")
    for f in result.files:
        print(f"  {f}  ({f.stat().st_size / 1e6:.2f} MB)")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
