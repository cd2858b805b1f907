"""``yolo-ts-client`` on many images: the options, and the run from input to summary.

    yolo-ts-client photos/ --out results.jsonl                       # a folder, recursively
    yolo-ts-client 'shots/**/*.png' --format yolo --out labels/      # a glob (quoted), YOLO label files
    yolo-ts-client data.yaml --format coco --out val.json --eval     # a dataset's val split, scored

The run: the images of the input (``sources.py``), minus those an earlier run already wrote to ``--out``
(``outputs.py``), go through ``--workers`` threads (``runner.py``); this thread writes each answer, counts
the errors and draws the progress bar (tqdm, on stderr; ``TQDM_DISABLE=1`` hides it). The summary names
the counts and images/s. Exit status: 0 when every image was answered, 1 when any failed or the run
stopped early, 2 for a bad input or option (nothing sent).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tools.batch import coco_eval, formats
from tools.batch.outputs import CHECKPOINT_S, CocoOutput, ErrorLog, JsonlOutput, OutputError, YoloOutput, sidecar
from tools.batch.runner import Outcome, Request, Runner
from tools.batch.sources import ImageSet, SourceError, image_set, is_batch_input  # noqa: F401 (tools/client.py asks it)
from tools.client import ClientError, KeyRing

FORMATS = ("jsonl", "coco", "yolo")
DEFAULT_WORKERS = 8  # requests in flight: two batches of the archive's batchSize 4, so one fills while one runs
YOLO_TOP5 = 5  # Ultralytics writes a classify model's top 5 classes


class UsageError(ValueError):
    """An option or input that cannot work (exit status 2, nothing sent)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("many images (a folder, a glob, a text file of paths, a dataset YAML, or several files)")
    g.add_argument("--out", type=Path, help="where the answers go: a file (jsonl, coco) or a folder (yolo); "
                   "a second run with the same --out skips the images already answered (default jsonl: stdout)")
    g.add_argument("--format", choices=FORMATS, default="jsonl", help="jsonl: the answers with their paths; coco: "
                   "COCO results (+ OUT-STEM.images.json, the image ids); yolo: Ultralytics' label files (default jsonl)")
    g.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help=f"requests in flight (default {DEFAULT_WORKERS})")
    g.add_argument("--retries", type=int, default=5, help="retries of an image on 503, connection errors and timeouts (default 5)")
    g.add_argument("--save-dir", type=Path, help="write each image with its answer drawn on it here (same relative names)")
    g.add_argument("--split", default="val", help="a dataset YAML's split to read (default val)")
    g.add_argument("--coco-gt", type=Path, help="--format coco: a COCO annotation file whose image ids and category ids the results use")
    g.add_argument("--eval", action="store_true", help="--format coco: print the COCO mAP50-95 and mAP50 against --coco-gt or "
                   "the dataset YAML's labels (needs pycocotools)")
    g.add_argument("--full-precision", action="store_true", help="ask for unrounded coordinates and scores (always on with --format yolo)")


def wants_batch(args: argparse.Namespace) -> bool:
    """An option only a batch has (one image file with ``--out`` is a batch of one)."""
    return any(getattr(args, k) for k in ("out", "save_dir", "coco_gt", "eval")) or args.format != "jsonl"


def check_options(args: argparse.Namespace) -> None:
    """Option combinations that cannot work, before anything is read or sent."""
    if args.save:
        raise UsageError("--save writes one picture; for many images use --save-dir DIR")
    if args.workers < 1 or args.retries < 0:
        raise UsageError("--workers must be 1 or more and --retries 0 or more")
    if args.format != "jsonl" and args.out is None:
        raise UsageError(f"--format {args.format} needs --out ({'a folder' if args.format == 'yolo' else 'a file'})")
    if (args.eval or args.coco_gt) and args.format != "coco":
        raise UsageError("--eval and --coco-gt go with --format coco")
    if args.format == "yolo" and args.top_k is not None and args.top_k < YOLO_TOP5:
        raise UsageError(f"--format yolo writes Ultralytics' top-{YOLO_TOP5} lines of a classify model: --top-k must be {YOLO_TOP5} or more")
    if args.eval:
        coco_eval.require_pycocotools()


class CocoIds:
    """The COCO ids the results use: those of ``--coco-gt`` (images by ``file_name``, or by file name
    alone when that is unique; categories by name), else the record's own image ids and the class ids."""

    def __init__(self, gt: dict | None) -> None:
        self.gt = gt
        self.images: dict[str, int] = {}
        self.categories: dict[str, int] = {}
        if gt is not None:
            by_base: dict[str, list[int]] = {}
            for im in gt["images"]:
                self.images[im["file_name"]] = im["id"]
                by_base.setdefault(Path(im["file_name"]).name, []).append(im["id"])
            self.images.update({k: v[0] for k, v in by_base.items() if len(v) == 1 and k not in self.images})
            self.categories = {c["name"]: c["id"] for c in gt["categories"]}

    def image_id(self, name: str) -> int | None:
        if self.gt is None:
            return None
        return self.images.get(name, self.images.get(Path(name).name))

    def category_id(self, class_id: int, class_name: str) -> int:
        if self.gt is None:
            return class_id
        if class_name not in self.categories:
            raise ClientError(f"the model's class {class_name!r} is not a category of --coco-gt ({', '.join(list(self.categories)[:8])}, ...)")
        return self.categories[class_name]


def open_output(args: argparse.Namespace, ids: CocoIds):
    if args.format == "coco":
        return CocoOutput(args.out, ids.category_id, ids.image_id)
    if args.format == "yolo":
        return YoloOutput(args.out)
    from tqdm import tqdm

    return JsonlOutput(args.out, lambda line: tqdm.write(line, file=sys.stdout))  # stdout without --out, under the bar


def request_params(args: argparse.Namespace) -> dict:
    params = {"conf": args.conf, "iou": args.iou, "max_det": args.max_det, "classes": args.classes, "top_k": args.top_k}
    if args.polygons:
        params["polygons"] = "true"
    if args.full_precision or args.format == "yolo":
        params["full_precision"] = "true"
    return {k: v for k, v in params.items() if v is not None}


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True, mininterval=0.5, file=sys.stderr,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def run(args: argparse.Namespace) -> int:
    """The batch run; see the module doc."""
    try:
        check_options(args)
        exclude = tuple(p.resolve() for p in (args.out, args.save_dir) if p is not None)  # the run's own outputs are no inputs
        images = image_set(args.inputs, args.split, exclude)
        if args.save_dir is not None and args.save_dir.resolve() == images.root:
            raise UsageError(f"--save-dir {args.save_dir} is the input folder: the pictures would replace the images")
        gt = coco_eval.load_coco_gt(args.coco_gt) if args.coco_gt else None
        if args.eval and gt is None and images.dataset is None:
            raise UsageError("--eval needs ground truth: a dataset YAML with labels as input, or --coco-gt FILE")
        ids = CocoIds(gt)
        if gt is not None:
            missing = [images.name(p) for p in images.paths if ids.image_id(images.name(p)) is None]
            if missing:
                raise UsageError(f"{len(missing)} image(s) are not in {args.coco_gt} (e.g. {missing[0]}); its file_name must be "
                                 "the image's path relative to the input folder, or its file name")
        output = open_output(args, ids)
    except (UsageError, SourceError, OutputError, coco_eval.EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out cannot be created or opened
        print(f"error: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return _send_all(args, images, output, ids)


def _send_all(args: argparse.Namespace, images: ImageSet, output, ids: CocoIds) -> int:
    from tqdm import tqdm

    if images.skipped:
        shown = ", ".join(images.name(p) for p in images.skipped[:3]) + (", ..." if len(images.skipped) > 3 else "")
        print(f"note: {len(images.skipped)} file(s) are not images by their suffix and are skipped: {shown}", file=sys.stderr)
    todo = [p for p in images.paths if images.name(p) not in output.answered]
    already = len(images.paths) - len(todo)
    errors = ErrorLog(sidecar(args.out, "errors.jsonl", args.format == "yolo") if args.out else None, lambda m: tqdm.write(m, file=sys.stderr))
    keys = KeyRing(args.key_file, args.management_url, args.timeout)
    runner = Runner(keys, Request(args.url, request_params(args), args.timeout, args.retries), args.workers, images.name, args.save_dir)
    answered, stopped = 0, None
    bar = _progress(len(images.paths), already)
    bar.set_postfix_str("errors=0", refresh=False)
    last_checkpoint = t0 = time.monotonic()

    def on_outcome(o: Outcome) -> None:
        nonlocal answered, last_checkpoint
        if o.ok:
            output.add(o.name, o.answer)
            answered += 1
        else:
            errors.add(o.name, o.status, o.error_type, o.message)
            bar.set_postfix_str(f"errors={errors.count}", refresh=False)
        bar.update()
        if time.monotonic() - last_checkpoint > CHECKPOINT_S:
            output.checkpoint()
            last_checkpoint = time.monotonic()

    try:
        runner.run(todo, on_outcome)
        stopped = runner.stopped
    except (ClientError, formats.FormatError) as e:  # raised while writing an answer: the format does not fit
        stopped = str(e)
    except OSError as e:
        stopped = f"cannot write {e.filename or 'the output'}: {e.strerror or e}"
    except KeyboardInterrupt:
        stopped = "interrupted (Ctrl-C)"
    finally:
        bar.close()
        errors.close()
    try:
        output.close()
    except OSError as e:
        stopped = stopped or f"cannot write {e.filename or 'the output'}: {e.strerror or e}"
    wall = time.monotonic() - t0
    where = output.describe()
    print(f"{answered} of {len(todo)} image(s) answered, {errors.count} failed"
          + (f", {already} skipped (already in {args.out})" if already else "")
          + f", in {wall:.1f} s: {answered / wall if wall > 0 else 0:.1f} images/s; answers in {where}"
          + (f"; errors in {errors.path}" if errors.count and errors.path else ""), file=sys.stderr)
    if stopped:
        left = len(todo) - answered - errors.count
        print(f"error: {stopped}. Stopped with {left} image(s) not answered; the answers so far are kept"
              + ("; run the same command again to go on" if args.out else ""), file=sys.stderr)
    if args.eval and not stopped:
        try:
            _evaluate(args, images, output, ids)
        except coco_eval.EvalError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 1 if stopped or errors.count else 0


def _evaluate(args: argparse.Namespace, images: ImageSet, output: CocoOutput, ids: CocoIds) -> None:
    if ids.gt is not None:
        gt, source = ids.gt, str(args.coco_gt)
    else:
        path_of = {images.name(p): p for p in images.paths}
        gt = coco_eval.ground_truth_from_labels(
            [im for im in output.record.images.values() if im["file_name"] in path_of],
            lambda name: images.dataset.label_path(path_of[name]), images.dataset.names, output.results)
        source = f"the labels of {images.dataset.yaml.name} ({images.dataset.split})"
    metrics = coco_eval.evaluate(gt, output.results)
    print(f"COCO metrics (pycocotools) of {len(output.record.images)} image(s) against {source}:")
    for line in coco_eval.format_metrics(metrics):
        print(line)
