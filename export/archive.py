"""Export directory -> ``MODEL_STORE/NAME.mar`` with the plain ``torch-model-archiver`` command.

``torch-model-archiver --extra-files`` copies the *contents* of a directory into the model
directory (``handler/`` would come out flattened: ``pipeline.py`` etc. at the top, next to whatever
else is on ``sys.path``). The handler imports ``from handler.pipeline import ...``, so the archive
needs a ``handler/`` package inside the model directory. We therefore stage a copy of the package's
``*.py`` files as ``EXPORT_DIR/code/handler/`` and pass ``EXPORT_DIR/code`` as an extra file.

The command, as the README documents it (from the repository root, export in ``exports/yolo``)::

    mkdir -p exports/yolo/code && rm -rf exports/yolo/code/handler && cp -r handler exports/yolo/code/
    torch-model-archiver --model-name yolo --version 1.0 \\
        --serialized-file exports/yolo/backbone.pt \\
        --handler handler/yolo_handler.py \\
        --extra-files exports/yolo/postprocess.pt,exports/yolo/metadata.json,exports/yolo/code \\
        --config-file exports/yolo/model-config.yaml \\
        --export-path model_store --force
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import handler
from export.checkpoint import ExportError
from handler.config import HandlerConfig
from handler.pipeline import BACKBONE_FILE, METADATA_FILE, POSTPROCESS_FILE

MODEL_CONFIG_FILE = "model-config.yaml"
CODE_DIR = "code"  # EXPORT_DIR/code/handler/ becomes MODEL_DIR/handler/
HANDLER_DIR = Path(handler.__file__).resolve().parent
HANDLER_ENTRY = "yolo_handler.py"
CLIENT_ONLY = {"client.py"}  # dev-side module of the package; the worker does not need it


class ArchiveError(ExportError):
    """torch-model-archiver failed or is not installed."""


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def model_config_yaml(handler_settings: dict | None = None, batch_size: int = 4, max_batch_delay_ms: int = 20) -> str:
    """The archive's ``model-config.yaml``: TorchServe's worker/batching keys and our ``handler:`` section."""
    settings = HandlerConfig.from_dict(handler_settings or {})  # fail here, not in the worker
    comments = {
        "conf": "default score threshold; a request may override it",
        "iou": "default NMS IoU threshold; a request may override it",
        "max_det": "default detections per image; a request may override it",
        "letterbox": "rect | square; null = the exported default",
        "imgsz": "int or [h, w], multiples of the max stride; null = the exported size",
        "half": "FP16 on CUDA; ignored with a warning on CPU",
        "max_image_pixels": "larger images get HTTP 413; 0 = no limit",
        "warmup": "forward passes when the worker loads",
        "torch_threads": "torch.set_num_threads; 0 = auto (on CPU: cores / maxWorkers)",
    }
    lines = [
        "# TorchServe model settings (https://github.com/pytorch/serve/blob/master/docs/configuration.md)",
        "minWorkers: 1",
        "maxWorkers: 1",
        f"batchSize: {batch_size}",
        f"maxBatchDelay: {max_batch_delay_ms}  # ms to wait for a batch to fill",
        "responseTimeout: 120  # s",
        "# Settings of handler/yolo_handler.py, validated by handler/config.py when the worker loads",
        "handler:",
    ]
    for key, comment in comments.items():
        lines.append(f"  {key}: {_yaml_value(getattr(settings, key))}  # {comment}")
    return "\n".join(lines) + "\n"


def stage_handler_code(export_dir: Path) -> Path:
    """Copy ``handler/*.py`` (less the client) to ``EXPORT_DIR/code/handler/`` (a fresh copy, no ``__pycache__``)."""
    code = export_dir / CODE_DIR
    target = code / "handler"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for src in sorted(p for p in HANDLER_DIR.glob("*.py") if p.name not in CLIENT_ONLY):
        shutil.copy2(src, target / src.name)
    return code


def backbone_file(export_dir: Path) -> str:
    """The backbone file ``metadata.json`` names: ``backbone.pt``, or ``backbone.pt2`` for ``--format aoti``."""
    return json.loads((export_dir / METADATA_FILE).read_text()).get("backbone", BACKBONE_FILE)


def archiver_command(export_dir: Path, name: str, model_store: Path) -> list[str]:
    """The README's torch-model-archiver command for this export (paths absolute)."""
    exe = Path(sys.executable).with_name("torch-model-archiver")
    return [
        str(exe) if exe.exists() else "torch-model-archiver",
        "--model-name", name,
        "--version", "1.0",
        "--serialized-file", str(export_dir / backbone_file(export_dir)),
        "--handler", str(HANDLER_DIR / HANDLER_ENTRY),
        "--extra-files", ",".join(str(export_dir / f) for f in (POSTPROCESS_FILE, METADATA_FILE, CODE_DIR)),
        "--config-file", str(export_dir / MODEL_CONFIG_FILE),
        "--export-path", str(model_store),
        "--force",
    ]


def build_archive(
    export_dir: Path, name: str, model_store: Path, handler_settings: dict | None = None, batch_size: int = 4
) -> Path:
    """Write ``model-config.yaml`` into ``export_dir``, stage the handler package, run torch-model-archiver.

    Returns the path of ``model_store/NAME.mar``.
    """
    export_dir, model_store = Path(export_dir).resolve(), Path(model_store).resolve()
    for f in (METADATA_FILE, POSTPROCESS_FILE, None):
        f = f or backbone_file(export_dir)  # named by metadata.json, so checked after it
        if not (export_dir / f).is_file():
            raise ArchiveError(f"{export_dir / f} not found; run `python -m export` first")
    (export_dir / MODEL_CONFIG_FILE).write_text(model_config_yaml(handler_settings, batch_size))
    stage_handler_code(export_dir)
    model_store.mkdir(parents=True, exist_ok=True)
    cmd = archiver_command(export_dir, name, model_store)
    # torch-model-archiver stages the files in $TMPDIR/NAME: a private TMPDIR keeps two builds of the
    # same model name (two users, parallel tests) from overwriting each other's staging directory.
    with tempfile.TemporaryDirectory(prefix="archiver_") as tmp:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": tmp})
        except FileNotFoundError:
            raise ArchiveError("torch-model-archiver is not installed; pip install torch-model-archiver") from None
    if proc.returncode != 0:
        raise ArchiveError(f"torch-model-archiver failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    mar = model_store / f"{name}.mar"
    if not mar.is_file():
        raise ArchiveError(f"torch-model-archiver did not write {mar}")
    return mar
