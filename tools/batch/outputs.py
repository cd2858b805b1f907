"""Where a batch's answers go (``--format`` and ``--out``), and what a second run reads to resume.

===========  ==========================  ===============================================================
format       ``--out``                   written beside it
===========  ==========================  ===============================================================
``jsonl``    ``FILE`` (stdout if none)   (none: each line is an answered image)
``coco``     ``FILE`` (a JSON list)      ``STEM.images.json``: ``{"images": [{"id", "file_name",
                                         "width", "height"}], "categories": [{"id", "name"}]}``, the
                                         image ids the results use
``yolo``     ``DIR`` of ``.txt`` labels  ``DIR.images.json``, the same record (for resuming: an image
                                         without detections has no label file)
===========  ==========================  ===============================================================

and, for every format, ``STEM.errors.jsonl``: the images of the last run that failed, one
``{"path", "status", "error": {"type", "message"}}`` per line (none when nothing failed).

Resuming: the images named in ``FILE`` (jsonl) or in the ``.images.json`` record are skipped by the next
run with the same ``--out``. An output that exists but was not written by this client (no record beside
it, or lines without ``"path"``) is refused, so that the client never changes a file it did not write.
The COCO file and the records are rewritten whole (to a temporary file, then renamed) every few seconds
and at the end, also when the run stops on an error or Ctrl-C.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, TextIO

from tools.batch import formats

CHECKPOINT_S = 10.0  # how often the COCO file and the image records are rewritten during a run


class OutputError(ValueError):
    """``--out`` cannot be used as asked (one line, for the user)."""


def sidecar(out: Path, what: str, is_dir: bool = False) -> Path:
    """``results.json`` -> ``results.<what>``; a folder ``labels`` -> ``labels.<what>``."""
    return out.with_name(f"{out.name if is_dir else out.stem}.{what}")


def write_json_atomically(path: Path, value: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, separators=(",", ":")))
    os.replace(partial, path)


class ImageRecord:
    """The ``.images.json`` record: each answered image's COCO id, name and size, and the classes seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.images: dict[str, dict] = {}  # name -> {"id", "file_name", "width", "height"}
        self.categories: dict[int, str] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
                self.images = {im["file_name"]: im for im in data["images"]}
                self.categories = {int(c["id"]): c["name"] for c in data["categories"]}
            except (ValueError, KeyError, TypeError) as e:
                raise OutputError(f"{path} is not an image record of this client ({e}); move it away or choose another --out") from None
        self._next_id = max((int(im["id"]) for im in self.images.values() if isinstance(im["id"], int)), default=0) + 1

    def add(self, name: str, answer: dict, image_id: int | None = None) -> int:
        """Record ``name`` (its COCO id: ``image_id``, or the next free one); returns the id."""
        if image_id is None:
            image_id, self._next_id = self._next_id, self._next_id + 1
        size = answer.get("image", {})
        self.images[name] = {"id": image_id, "file_name": name, "width": size.get("width"), "height": size.get("height")}
        for d in answer.get("detections", answer.get("top", [])):
            self.categories.setdefault(int(d["class_id"]), d["class_name"])
        return image_id

    def save(self) -> None:
        write_json_atomically(self.path, {
            "images": sorted(self.images.values(), key=lambda im: im["id"]),
            "categories": [{"id": k, "name": v} for k, v in sorted(self.categories.items())],
        })


class JsonlOutput:
    """``--format jsonl``: one line per answered image, appended as answers arrive (stdout without ``--out``)."""

    def __init__(self, out: Path | None, print_line: Callable[[str], None] | None = None) -> None:
        """``print_line``: how a line goes to stdout without ``--out`` (the CLI's keeps the progress bar
        intact); default ``print``."""
        self.out = out
        self.answered: set[str] = set()
        self._print = print_line or (lambda line: print(line, flush=True))
        self._file: TextIO | None = None
        if out is None:
            return
        if out.is_dir():
            raise OutputError(f"--out {out} is a folder; --format jsonl writes a file")
        if out.exists():
            self.answered = self._resume(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(out, "a", encoding="utf-8")

    @staticmethod
    def _resume(out: Path) -> set[str]:
        """The names in an earlier run's file; a last line cut short (the run was killed while writing it)
        is removed, so that appending starts on a fresh line."""
        data = out.read_bytes()
        keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
        names = set()
        for number, line in enumerate(keep.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                names.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                raise OutputError(f"{out} line {number} is not an answer of this client (JSON with \"path\"); "
                                  "choose another --out") from None
        if len(keep) != len(data):
            with open(out, "r+b") as f:
                f.truncate(len(keep))
        return names

    def add(self, name: str, answer: dict) -> None:
        if self._file is None:
            self._print(formats.jsonl_line(name, answer))
            return
        self._file.write(formats.jsonl_line(name, answer) + "\n")
        self._file.flush()

    def checkpoint(self) -> None:
        pass

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def describe(self) -> str:
        return str(self.out) if self.out else "stdout"


class CocoOutput:
    """``--format coco``: the COCO results file and its image record, rewritten at checkpoints."""

    def __init__(self, out: Path, category_id: Callable[[int, str], int], image_id: Callable[[str], int | None]) -> None:
        if out.is_dir():
            raise OutputError(f"--out {out} is a folder; --format coco writes a JSON file")
        self.out, self.category_id, self.image_id = out, category_id, image_id
        self.record = ImageRecord(sidecar(out, "images.json"))
        self.results: list[dict] = []
        if out.exists():
            if not self.record.path.exists():
                raise OutputError(f"{out} exists but {self.record.path.name} does not: it was not written by this client; "
                                  "choose another --out")
            try:
                self.results = json.loads(out.read_text())
                assert isinstance(self.results, list)
            except (ValueError, AssertionError):
                raise OutputError(f"{out} is not a COCO results list; choose another --out") from None
        self.answered = set(self.record.images)

    def add(self, name: str, answer: dict) -> None:
        image_id = self.record.add(name, answer, self.image_id(name))
        self.results += formats.coco_annotations(answer, image_id, self.category_id)

    def checkpoint(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.out, self.results)
        self.record.save()

    close = checkpoint

    def describe(self) -> str:
        return f"{self.out} (image ids in {self.record.path.name})"


class YoloOutput:
    """``--format yolo``: a label file per image in ``out``, and the record of the answered images beside it."""

    def __init__(self, out: Path) -> None:
        if out.is_file():
            raise OutputError(f"--out {out} is a file; --format yolo writes a folder of label files")
        self.out = out
        self.record = ImageRecord(sidecar(out, "images.json", is_dir=True))
        if out.is_dir() and any(out.iterdir()) and not self.record.path.exists():
            raise OutputError(f"{out} holds files but {self.record.path.name} does not exist beside it: it was not written "
                              "by this client (labels of a dataset?); choose a new folder for --out")
        self.answered = set(self.record.images)

    def add(self, name: str, answer: dict) -> None:
        formats.write_yolo_label(answer, formats.yolo_label_path(self.out, name))
        self.record.add(name, answer)

    def checkpoint(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.record.save()

    close = checkpoint

    def describe(self) -> str:
        return f"{self.out}/ (answered images in {self.record.path.name})"


class ErrorLog:
    """The images that failed in this run: ``STEM.errors.jsonl`` beside ``--out`` (an older one is replaced),
    and the first few on stderr."""

    SHOWN = 5

    def __init__(self, path: Path | None, echo: Callable[[str], None]) -> None:
        self.path, self.echo = path, echo
        self.count = 0
        self._file: TextIO | None = None
        if path is not None:
            path.unlink(missing_ok=True)

    def add(self, name: str, status: int | None, kind: str, message: str) -> None:
        self.count += 1
        if self.count <= self.SHOWN:
            self.echo(f"error: {name}: " + (f"HTTP {status}: " if status else "") + message)
        elif self.count == self.SHOWN + 1:
            self.echo(f"(more errors: see {self.path})" if self.path else "(more errors not shown)")
        if self.path is not None:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "w", encoding="utf-8")
            self._file.write(json.dumps({"path": name, "status": status, "error": {"type": kind, "message": message}}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
