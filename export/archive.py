"""Export directory -> ``MODEL_STORE/NAME.mar`` with the plain ``torch-model-archiver`` command.

``torch-model-archiver --extra-files`` copies the *contents* of a directory into the model
directory (``handler/`` would come out flattened: ``pipeline.py`` etc. at the top, next to whatever
else is on ``sys.path``). The handler imports ``from handler.pipeline import ...``, so the archive
needs a ``handler/`` package inside the model directory. We therefore stage a copy of the package
(its ``.py`` files, subpackages included) as ``EXPORT_DIR/code/handler/`` and pass ``EXPORT_DIR/code``
as an extra file.

The command, as the README documents it (from the repository root, export in ``exports/yolo``)::

    mkdir -p exports/yolo/code && rm -rf exports/yolo/code/handler && cp -r handler exports/yolo/code/
    torch-model-archiver --model-name yolo --version 1.0 \\
        --serialized-file exports/yolo/backbone.pt \\
        --handler handler/yolo_handler.py \\
        --extra-files exports/yolo/postprocess.pt,exports/yolo/metadata.json,exports/yolo/code \\
        --config-file exports/yolo/model-config.yaml \\
        --export-path model_store --force

``--extra-files`` also lists the files of the runtimes the export proved (``metadata.json`` ``runtimes``), for
example ``exports/yolo/backbone.xml,exports/yolo/backbone.bin``; the serialized file is always ``backbone.pt``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import handler
from export.checkpoint import ExportError
from handler.config import HandlerConfig, TrackingConfig
from handler.contract import (
    BACKBONE_FILE,
    DEFAULT_MODEL_VERSION,
    METADATA_FILE,
    MODEL_CONFIG_FILE,
    POSTPROCESS_FILE,
    RUNTIMES_KEY,
    archive_file_name,
)

CODE_DIR = "code"  # EXPORT_DIR/code/handler/ becomes MODEL_DIR/handler/
HANDLER_DIR = Path(handler.__file__).resolve().parent
HANDLER_ENTRY = "yolo_handler.py"


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


# TorchServe's own per-model keys that the archive writes, with their defaults; a user's value wins. The one home
# of the shipped batching: deploy/kserve/config.properties repeats it in its model_snapshot (tests/test_facts.py).
TORCHSERVE_DEFAULTS: dict[str, object] = {
    "minWorkers": 1,
    "maxWorkers": 1,
    "batchSize": 4,
    "maxBatchDelay": None,  # BATCH_DELAY_MS of the device it is served on
    "responseTimeout": 120,
}
# maxBatchDelay (ms) by the device the model is served on (docs/benchmarks.md, "Batch delay, threads and a lone request's time"). On CPU a forward
# takes ~70 ms, so requests pile up while a batch runs and waiting buys little: a lone request pays the whole
# delay in QueueTime (measured: delay + ~2 ms), and 0 makes TorchServe's batch aggregator poll (~100 ms of
# QueueTime measured), so 2. On GPU (docs/benchmarks.md, "GPU": an H200, yolo11n-pose): the forward takes about 5 ms
# at any batch from 1 to 32, and a batch of one takes 13-19 ms from bytes to JSON (FP32); a batch of 8 takes 7 ms per
# image (the CPU's decode and postprocessing). A wait longer than a lone request's time never pays at low load, and
# one that short still lets batches of several fill under load, so 10.
BATCH_DELAY_MS = {"cpu": 2, "gpu": 10}
DEVICES = tuple(BATCH_DELAY_MS)
_TORCHSERVE_COMMENTS = {
    "maxBatchDelay": "ms to wait for a batch to fill",
    "responseTimeout": "s",
}
_HANDLER_COMMENTS = {
    "conf": "default score threshold; a request may override it",
    "iou": "default NMS IoU threshold; a request may override it",
    "max_det": "default detections per image; a request may override it",
    "letterbox": "rect | square; null = the exported default",
    "imgsz": "int or [h, w], multiples of the max stride; null = the exported size",
    "half": "FP16 on CUDA; ignored with a warning on CPU",
    "max_image_pixels": "larger images get HTTP 413; 0 = no limit",
    "warmup": "forward passes when the worker loads",
    "torch_threads": "torch.set_num_threads; 0 = auto (on CPU: usable CPUs (affinity, cgroup quota) / maxWorkers, see docs/deploy.md)",
    "cpu_fallback": "GPU worker with unusable CUDA: serve on CPU (true) or fail the load (false)",
    "runtime": "auto | torchscript | aoti | openvino: what runs the backbone; auto = the export's fastest proven runtime "
               "that is installed and runs on this CPU (docs/cpu-speed.md)",
}


_TRACKING_COMMENTS = {
    "enabled": "false: track/stream requests get 400 (e.g. a model with several workers)",
    "max_streams": "open video streams per worker; one more start gets 429",
    "idle_seconds": "a stream without a frame for this long is dropped; its next frame gets 410",
    "tracker": "bytetrack | botsort: the tracker of track=true",
    "conf": "default score threshold of a tracked frame (Ultralytics' track() default)",
    "bytetrack": "overrides of Ultralytics' bytetrack.yaml, e.g. {track_buffer: 60}",
    "botsort": "overrides of botsort.yaml (no ReID), e.g. {gmc_method: none}",
}


def tracking_section(tracking: TrackingConfig, torchserve: dict) -> list[str]:
    """The ``tracking:`` lines of ``model-config.yaml``: each setting with a comment; a tracker's parameters
    as the overrides of its Ultralytics YAML (a JSON flow mapping, which YAML reads as it is)."""
    lines = ["# Video streams (handler/video.py, docs/tracking.md). They live in the worker process: keep one worker",
             "# (minWorkers: 1, maxWorkers: 1) for a model that tracks; validated by handler/config.py when the worker loads"]
    warning = tracking.worker_warning(torchserve)
    if warning:
        lines.append(f"# WARNING: {warning}")
    lines.append("tracking:")
    for key, comment in _TRACKING_COMMENTS.items():
        value = getattr(tracking, key)
        if key in ("bytetrack", "botsort"):
            defaults = asdict(TrackingConfig().params(key))
            lines.append(f"  {key}: {json.dumps({k: v for k, v in asdict(value).items() if v != defaults[k]})}  # {comment}")
            continue
        lines.append(f"  {key}: {_yaml_value(int(value) if key == 'idle_seconds' and float(value).is_integer() else value)}  # {comment}")
    return lines


def model_config_yaml(
    handler_settings: dict | None = None,
    batch_size: int | None = None,
    max_batch_delay_ms: int | None = None,
    torchserve: dict | None = None,
    metadata: dict | None = None,
    tracking_settings: dict | None = None,
    device: str = "cpu",
) -> str:
    """The archive's ``model-config.yaml``: TorchServe's worker/batching keys, our ``handler:`` section and
    the ``tracking:`` section (``tracking_settings``).

    ``torchserve`` holds TorchServe keys that win over the defaults (a user's own file); keys we do not
    write ourselves are kept as they are. The ``handler:`` and ``tracking:`` sections are validated with the
    worker's own validators (and, given ``metadata``, against the exported model), so a bad value fails here."""
    settings = HandlerConfig.from_dict(handler_settings or {})  # fail here, not in the worker
    tracking = TrackingConfig.from_dict(tracking_settings or {})
    if metadata is not None:
        settings.check_model(metadata)
    delay = BATCH_DELAY_MS[device] if max_batch_delay_ms is None else max_batch_delay_ms
    batch = TORCHSERVE_DEFAULTS["batchSize"] if batch_size is None else batch_size
    values = {**TORCHSERVE_DEFAULTS, "batchSize": batch, "maxBatchDelay": delay, **(torchserve or {})}
    lines = ["# TorchServe model settings (https://github.com/pytorch/serve/blob/master/docs/configuration.md)"]
    for key, value in values.items():
        comment = f"  # {_TORCHSERVE_COMMENTS[key]}" if key in _TORCHSERVE_COMMENTS else ""
        lines.append(f"{key}: {_yaml_value(value)}{comment}")
    lines += ["# Settings of handler/yolo_handler.py, validated by handler/config.py when the worker loads"]
    lines += runtime_comment(metadata)
    lines.append("handler:")
    for key, comment in _HANDLER_COMMENTS.items():
        lines.append(f"  {key}: {_yaml_value(getattr(settings, key))}  # {comment}")
    lines += tracking_section(tracking, values)
    return "\n".join(lines) + "\n"


def runtime_comment(metadata: dict | None) -> list[str]:
    """What the export proved and measured (``runtimes`` in the metadata), as comment lines above ``handler:``: the
    choice ``runtime: auto`` makes where the first one runs."""
    from handler.runtime.runtimes import proven_runtimes

    if not metadata or RUNTIMES_KEY not in metadata:
        return []
    entries = proven_runtimes(metadata)
    lines = ["# runtimes the export checked (fp32: equal to Ultralytics; bf16, int8: within the drift it reported), in the",
             "# order runtime: auto tries them (raw forward p50 at the export's imgsz, on the export machine):"]
    lines += [f"#   {e.label}: {e.measured}" for e in entries]
    return lines + [f"# runtime: auto serves {entries[0].label} where it runs; write a runtime below to choose another"]


def runtime_files(metadata: dict) -> list[str]:
    """The backbone files besides ``backbone.pt`` that the archive carries: each proven runtime's, and the format's."""
    from handler.runtime.runtimes import proven_runtimes

    names = [name for e in proven_runtimes(metadata) for name in e.files] + [metadata.get("backbone", BACKBONE_FILE)]
    return [name for name in dict.fromkeys(names) if name != BACKBONE_FILE]


def read_model_config(path: Path) -> tuple[dict, dict | None]:
    """A user's ``model-config.yaml`` -> (its TorchServe keys and its ``tracking:`` section, its ``handler:``
    section); ``({}, None)`` if absent."""
    if not path.is_file():
        return {}, None
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ArchiveError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ArchiveError(f"{path} must be a mapping of settings, got {type(data).__name__}")
    handler_section = data.pop("handler", None)
    return data, handler_section


def stage_handler_code(export_dir: Path) -> Path:
    """Copy the ``handler`` package (its ``.py`` files, subpackages included) to ``EXPORT_DIR/code/handler/``
    (a fresh copy, no ``__pycache__``). Everything in ``handler/`` is serving code; tools live in ``tools/``."""
    code = export_dir / CODE_DIR
    target = code / "handler"
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    keep_py = lambda d, names: [n for n in names if not (n.endswith(".py") or (Path(d) / n).is_dir()) or n == "__pycache__"]
    shutil.copytree(HANDLER_DIR, target, ignore=keep_py)
    return code


def archiver_command(export_dir: Path, name: str, model_store: Path, version: str = DEFAULT_MODEL_VERSION) -> list[str]:
    """The README's torch-model-archiver command for this export (paths absolute). The serialized file is always the
    traced ``backbone.pt`` (the reference); the other runtimes' files go beside it as extra files."""
    exe = Path(sys.executable).with_name("torch-model-archiver")
    extra = [POSTPROCESS_FILE, METADATA_FILE, *runtime_files(json.loads((export_dir / METADATA_FILE).read_text())), CODE_DIR]
    return [
        str(exe) if exe.exists() else "torch-model-archiver",
        "--model-name", name,
        "--version", version,
        "--serialized-file", str(export_dir / BACKBONE_FILE),
        "--handler", str(HANDLER_DIR / HANDLER_ENTRY),
        "--extra-files", ",".join(str(export_dir / f) for f in extra),
        "--config-file", str(export_dir / MODEL_CONFIG_FILE),
        "--export-path", str(model_store),
        "--force",
    ]


def build_archive(
    export_dir: Path,
    name: str,
    model_store: Path,
    handler_settings: dict | None = None,
    batch_size: int | None = None,
    keep_user_config: bool = False,
    tracking_settings: dict | None = None,
    device: str = "cpu",
) -> Path:
    """Write ``model-config.yaml`` into ``export_dir``, stage the handler package, run torch-model-archiver.

    ``keep_user_config=True`` (``python -m export --archive``) keeps the values of an existing
    ``EXPORT_DIR/model-config.yaml`` that the user edited, validated exactly as the worker will validate
    them; ``handler_settings`` then override its ``handler:`` keys, ``tracking_settings`` its ``tracking:`` keys.
    Returns the path of ``model_store/NAME.mar``.
    """
    export_dir, model_store = Path(export_dir).resolve(), Path(model_store).resolve()
    for f in (METADATA_FILE, POSTPROCESS_FILE, BACKBONE_FILE, None):
        for needed in [f] if f else runtime_files(json.loads((export_dir / METADATA_FILE).read_text())):  # named by metadata.json
            if not (export_dir / needed).is_file():
                raise ArchiveError(f"{export_dir / needed} not found; run `python -m export` first")
    metadata = json.loads((export_dir / METADATA_FILE).read_text())
    torchserve: dict = {}
    if keep_user_config:
        torchserve, user_handler = read_model_config(export_dir / MODEL_CONFIG_FILE)
        handler_settings = {**(user_handler or {}), **(handler_settings or {})}
        batch_size = torchserve.pop("batchSize", batch_size)
    user_tracking = torchserve.pop("tracking", None)
    if user_tracking is not None and not isinstance(user_tracking, dict):
        raise ArchiveError(f"{export_dir / MODEL_CONFIG_FILE}: `tracking:` must be a mapping of settings, got {user_tracking!r}")
    tracking_settings = {**(user_tracking or {}), **(tracking_settings or {})}
    try:
        text = model_config_yaml(
            handler_settings, batch_size, torchserve=torchserve, metadata=metadata, tracking_settings=tracking_settings, device=device
        )
    except ValueError as e:
        raise ArchiveError(f"{export_dir / MODEL_CONFIG_FILE}: {e}") from None
    (export_dir / MODEL_CONFIG_FILE).write_text(text)
    stage_handler_code(export_dir)
    model_store.mkdir(parents=True, exist_ok=True)
    version = metadata.get("model_version", DEFAULT_MODEL_VERSION)
    mar = model_store / archive_file_name(name, version)
    # torch-model-archiver stages the files in $TMPDIR/NAME: a private TMPDIR keeps two builds of the
    # same model name (two users, parallel tests) from overwriting each other's staging directory. It
    # also writes NAME.mar whatever the version, so it writes into that TMPDIR, and the archive is moved
    # to its own name: a version 2.0 never replaces the yolo.mar that is serving.
    with tempfile.TemporaryDirectory(prefix="archiver_", dir=model_store) as tmp:
        cmd = archiver_command(export_dir, name, Path(tmp), version)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": tmp})
        except FileNotFoundError:
            raise ArchiveError("torch-model-archiver is not installed; pip install torch-model-archiver") from None
        if proc.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        written = Path(tmp) / f"{name}.mar"  # torch-model-archiver names the file after the model
        if not written.is_file():
            raise ArchiveError(f"torch-model-archiver did not write {written}")
        written.replace(mar)
    return mar
