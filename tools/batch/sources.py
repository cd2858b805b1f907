"""What a batch reads: the images of a folder, a glob, a text file of paths, an Ultralytics dataset YAML
split, or image files named on the command line.

Every source gives an :class:`ImageSet`: the image paths in a stable (sorted) order, the folder their
names are relative to (the names the outputs use: label files, saved pictures, COCO ``file_name``), and
for a dataset its class names and where each image's label file is. Paths are resolved the way
Ultralytics' dataset loader resolves them (``ultralytics/data/base.py`` ``get_img_files``,
``ultralytics/data/utils.py`` ``check_det_dataset``, ``img2label_paths``):

* a folder is searched recursively; a file counts as an image by its suffix;
* a text file lists one path per line; ``./x.jpg`` is relative to the text file, other relative paths to
  the working directory (blank lines and ``#`` comments are skipped);
* a dataset YAML's ``path`` (default: the YAML's folder) is its root, relative to the working directory
  as for Ultralytics (or, when the split is not found there, to the YAML's folder); the split (``val``
  unless ``--split``) is a folder, a text file or a list of them under that root; an image ``.../images/.../x.jpg``
  has its labels in ``.../labels/.../x.txt``.

Problems the user can fix (nothing there, no such split) raise :class:`SourceError` with one line.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

# The suffixes of the formats the server decodes (handler/image/decode.py: JPEG, PNG, WebP, BMP, TIFF); other
# files in a folder are skipped and counted.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".jpe", ".mpo", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff"})
LIST_SUFFIXES: frozenset[str] = frozenset({".txt"})
DATASET_SUFFIXES: frozenset[str] = frozenset({".yaml", ".yml"})
GLOB_CHARS = "*?["


class SourceError(ValueError):
    """The input names no image, or a dataset YAML lacks what the run needs (one line, for the user)."""


@dataclass(frozen=True)
class Dataset:
    """What a dataset YAML says besides its images: the YAML, its class names, the split read."""

    yaml: Path
    names: list[str]
    split: str

    @staticmethod
    def label_path(image: Path) -> Path:
        """Ultralytics' ``img2label_paths``: the last ``/images/`` becomes ``/labels/``, the suffix ``.txt``."""
        sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
        return Path(sb.join(os.fspath(image).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


@dataclass(frozen=True)
class ImageSet:
    """The images of one input, sorted, and the folder their names are relative to."""

    paths: list[Path]
    root: Path
    skipped: list[Path] = field(default_factory=list)  # files of a folder or glob that are not images by suffix
    dataset: Dataset | None = None

    def name(self, path: Path) -> str:
        """``path`` relative to :attr:`root`, with ``/`` (the name outputs use); a path outside the root (a
        dataset's list file may name any file) without its leading ``/``, so that outputs stay in their folder."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.relative_to(path.anchor).as_posix()


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_batch_input(inputs: list[str]) -> bool:
    """True unless ``inputs`` is one image file (what ``yolo-ts-client IMAGE`` answered before batches)."""
    if len(inputs) != 1:
        return True
    p = Path(inputs[0])
    return p.is_dir() or (any(c in inputs[0] for c in GLOB_CHARS) and not p.exists()) or p.suffix.lower() in LIST_SUFFIXES | DATASET_SUFFIXES


def image_set(inputs: list[str], split: str = "val", exclude: tuple[Path, ...] = ()) -> ImageSet:
    """The images ``inputs`` name: one folder, glob, list file or dataset YAML, or several image files.
    ``exclude``: folders whose files are never inputs (the run's own output folders)."""
    if not inputs:
        raise SourceError("give a folder, a glob, a text file of image paths, a dataset YAML or image files")
    if len(inputs) > 1:
        missing = [p for p in inputs if not Path(p).exists()]
        if missing:
            raise SourceError(f"{missing[0]} does not exist" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        paths = sorted({Path(p).resolve() for p in inputs})
        return _only_images(paths, Path(os.path.commonpath([p.parent for p in paths])), " ".join(inputs[:3]))
    spec = inputs[0]
    path = Path(spec)
    if path.is_dir():
        return _folder(path.resolve(), exclude)
    if not path.exists() and any(c in spec for c in GLOB_CHARS):
        return _glob(spec, exclude)
    if not path.exists():
        raise SourceError(f"{spec} does not exist")
    if path.suffix.lower() in DATASET_SUFFIXES:
        return _dataset(path.resolve(), split, exclude)
    if path.suffix.lower() in LIST_SUFFIXES:
        paths = _list_file(path.resolve())
        if not paths:
            raise SourceError(f"{spec} lists no image path")
        return ImageSet(sorted(set(paths)), Path(os.path.commonpath([p.parent for p in paths])))
    return ImageSet([path.resolve()], path.resolve().parent)


def _excluded(path: Path, exclude: tuple[Path, ...]) -> bool:
    return any(path.is_relative_to(e) for e in exclude)


def _walk(folder: Path, exclude: tuple[Path, ...]) -> list[Path]:
    """Files under ``folder``, recursively, hidden files and folders left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _excluded(Path(dirpath, d), exclude))
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return found


def _only_images(files: list[Path], root: Path, what: str) -> ImageSet:
    images = sorted(p for p in files if is_image(p))
    if not images:
        shown = ", ".join(p.name for p in files[:3]) + (", ..." if len(files) > 3 else "")
        found = f"only {len(files)} other file(s): {shown}" if files else "nothing"
        raise SourceError(f"no images in {what} (found {found}); images are {', '.join(sorted(IMAGE_SUFFIXES))} files")
    return ImageSet(images, root, sorted(p for p in files if not is_image(p)))


def _folder(folder: Path, exclude: tuple[Path, ...]) -> ImageSet:
    return _only_images(_walk(folder, exclude), folder, f"{folder} (searched recursively)")


def _glob(pattern: str, exclude: tuple[Path, ...]) -> ImageSet:
    files = [Path(p).resolve() for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
    files = [p for p in files if not _excluded(p, exclude)]
    if not files:
        raise SourceError(f"no file matches {pattern}")
    return _only_images(files, Path(os.path.commonpath([p.parent for p in files])), pattern)


def _list_file(path: Path) -> list[Path]:
    """The paths a text file lists (Ultralytics' rules, see the module doc)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    paths = []
    for line in (s.strip() for s in lines):
        if not line or line.startswith("#"):
            continue
        paths.append((path.parent / line[2:]) if line.startswith("./") else Path(line))
    return [p.resolve() for p in paths]


def _dataset(yaml_path: Path, split: str, exclude: tuple[Path, ...]) -> ImageSet:
    import yaml

    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SourceError(f"cannot read {yaml_path} as YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SourceError(f"{yaml_path} is not a dataset YAML (a mapping with path, {split}, names)")
    if not data.get(split):
        splits = [k for k in ("train", "val", "test", "minival") if data.get(k)]
        raise SourceError(f"{yaml_path} has no {split!r} split (it has {', '.join(splits) or 'none'}); choose one with --split")
    names = data.get("names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list):
        names = [f"class_{i}" for i in range(int(data.get("nc", 0)))]
    entries = data[split] if isinstance(data[split], list) else [data[split]]
    given = Path(data.get("path") or yaml_path.parent)
    # a relative root is relative to the working directory (Ultralytics); if the split is not there, to the YAML's folder
    roots = [given.resolve()] if given.is_absolute() else [given.resolve(), (yaml_path.parent / given).resolve()]
    root = next((r for r in roots if all((r / str(e)).exists() for e in entries)), roots[-1])
    files: list[Path] = []
    for entry in entries:
        p = (root / str(entry)).resolve()
        if p.is_dir():
            files += _walk(p, exclude)
        elif p.is_file():
            files += _list_file(p)
        else:
            raise SourceError(f"{yaml_path}: {split} entry {entry!r} is neither a folder nor a text file under {root}")
    images = _only_images(files, root, f"the {split!r} split of {yaml_path}")
    return ImageSet(images.paths, root, images.skipped, Dataset(yaml_path, [str(n) for n in names], split))
