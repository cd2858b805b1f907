"""The artifact contract between ``export/`` (which writes it) and ``handler/`` (which reads it).

One home for every fact both sides must agree on: the contract version, the file names inside an
export directory and a ``.mar``, the backbone formats, and the keys of ``metadata.json``. The exporter
imports these names to write the files; the handler imports them to read and check the files.
Neither side spells one of them out on its own.

A new contract version is needed whenever the postprocessor's inputs or outputs change (see
``export/postprocess.py`` and the task modules in ``handler/tasks/``): the handler refuses files of
another version with a message that says to re-export.
"""

from __future__ import annotations

CONTRACT_VERSION = 2  # 2: a third postprocessor output (masks), segment and obb rows

# Files of an export directory (``python -m export --out DIR``) and of the model directory of a .mar.
METADATA_FILE = "metadata.json"  # also the key of the metadata in the TorchScript _extra_files
BACKBONE_FILE = "backbone.pt"  # traced TorchScript backbone
AOTI_BACKBONE_FILE = "backbone.pt2"  # AOTInductor package (``--format aoti``, or a runtime the export proved)
OPENVINO_IR_FILE = "backbone.xml"  # OpenVINO IR of the backbone (the openvino runtime), with its weights:
OPENVINO_WEIGHTS_FILE = "backbone.bin"
POSTPROCESS_FILE = "postprocess.pt"  # scripted postprocessor
MODEL_CONFIG_FILE = "model-config.yaml"  # TorchServe's per-model settings, with our ``handler:`` section
DEFAULT_MODEL_VERSION = "1.0"  # NAME.mar; any other version is archived as NAME-VERSION.mar


# The value of an "ignore" pixel in a semantic class map (a class the request filtered out), Ultralytics' 255:
# export/semantic.py's postprocessor writes it, handler/tasks/semantic.py names it in the response.
SEMANTIC_IGNORE = 255


def archive_file_name(name: str, version: str) -> str:
    """The .mar file of a model version in a model store: ``yolo.mar`` for 1.0, ``yolo-2.0.mar`` otherwise."""
    return f"{name}.mar" if version == DEFAULT_MODEL_VERSION else f"{name}-{version}.mar"

# Backbone formats (metadata["format"]); metadata["backbone"] names the file of that format.
TORCHSCRIPT_FORMAT = "torchscript"
AOTI_FORMAT = "aoti"
BACKBONE_FILES = {TORCHSCRIPT_FORMAT: BACKBONE_FILE, AOTI_FORMAT: AOTI_BACKBONE_FILE}
AOTI_METADATA_KEY = METADATA_FILE  # key of the export metadata in an AOTInductor package's metadata

# Backbone runtimes (model-config.yaml ``handler: runtime:``): what runs the backbone in the worker. Every one has the
# traced backbone's contract (``float32[B, 3, H, W]`` -> tuple of raw head outputs); ``handler/runtime/runtimes.py``.
TORCHSCRIPT_RUNTIME = "torchscript"  # backbone.pt, always in the archive: the reference
AOTI_RUNTIME = "aoti"  # backbone.pt2
OPENVINO_RUNTIME = "openvino"  # backbone.xml + backbone.bin
RUNTIMES = (TORCHSCRIPT_RUNTIME, AOTI_RUNTIME, OPENVINO_RUNTIME)
AUTO_RUNTIME = "auto"  # the export's fastest proven runtime that runs in this worker
RUNTIME_SETTINGS = (AUTO_RUNTIME, *RUNTIMES)  # the values of ``handler: runtime:``
RUNTIME_FILES = {TORCHSCRIPT_RUNTIME: [BACKBONE_FILE], AOTI_RUNTIME: [AOTI_BACKBONE_FILE],
                 OPENVINO_RUNTIME: [OPENVINO_IR_FILE, OPENVINO_WEIGHTS_FILE]}
PRECISIONS = ("fp32", "bf16", "int8")  # fp32 is equal to Ultralytics; bf16 and int8 only by the user's choice
RUNTIMES_KEY = "runtimes"  # metadata: the runtimes the export proved, fastest first (OPTIONAL_METADATA_KEYS)

# The keys of metadata.json, in the order the exporter writes them, with what each holds.
METADATA_KEYS: dict[str, str] = {
    "contract": "int: CONTRACT_VERSION of the files",
    "name": "str: model name (the .mar name, /predictions/NAME)",
    "model_version": "str: the model version (torch-model-archiver --version, /predictions/NAME/VERSION)",
    "task": "str: the task; handler/tasks/ maps it to the object that serves it",
    "names": "list[str]: class names, index = class id",
    "nc": "int: number of classes",
    "kpt_shape": "[nkpt, kdim] for pose models, else null",
    "kpt_decode": "'pose' (v8/11) | 'pose26' | null",
    "nm": "int: mask coefficients per detection (segment), else 0",
    "angle_decode": "'obb' (v8/11) | 'obb26' | null",
    "stride": "list[float]: stride of each head level",
    "max_stride": "int: the input grid; H and W are multiples of it",
    "reg_max": "int: DFL bins (1: direct ltrb)",
    "end2end": "bool: NMS-free one-to-one head",
    "head": "str: human-readable head choice",
    "head_type": "str: the Ultralytics head class name",
    "imgsz": "[h, w]: the network input size the model was exported for",
    "letterbox": "'rect' | 'square' | null (classify: resize + crop)",
    "versions": "{ultralytics, torch}: versions that exported the files",
    "weights": "{file, sha256}: the checkpoint the files come from",
    "format": "TORCHSCRIPT_FORMAT | AOTI_FORMAT",
    "backbone": "the backbone's file name (BACKBONE_FILES[format])",
}


# Optional keys: present only where they apply, so older exports stay valid.
OPTIONAL_METADATA_KEYS: dict[str, str] = {
    "precision": "'int8' | 'bf16': the reduced precision of the export's chosen runtime (--quantize); absent: fp32",
    RUNTIMES_KEY: "list of {runtime, precision, files, forward_ms, threads, cpu_flags (aoti: the ISA its code needs)}: "
    "the runtimes the export proved against Ultralytics (or within the drift allowed), fastest first; absent: the "
    "format's backbone alone",
}


class ArtifactError(RuntimeError):
    """The exported files are missing, inconsistent, or of another contract version."""


def check_metadata(meta: dict, where: str) -> dict:
    """Raise :class:`ArtifactError` unless ``meta`` is metadata of this contract version with every key."""
    if meta.get("contract") != CONTRACT_VERSION:
        raise ArtifactError(
            f"exported files have contract version {meta.get('contract')}, this handler reads {CONTRACT_VERSION}; "
            "re-export with the matching `python -m export`"
        )
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise ArtifactError(f"{where} lacks metadata key(s) {missing}; re-export it with `python -m export`")
    return meta
