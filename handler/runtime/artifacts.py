"""Loading the exported files of a model directory (an export directory, or the model directory of a ``.mar``).

``postprocess.pt`` and the backbone of the runtime chosen for this worker (``handler/runtime/runtimes.py``: the
traced ``backbone.pt``, ``backbone.pt2`` or the OpenVINO IR), each with its embedded ``metadata.json``; the two must
come from one export, and the metadata must be of this handler's contract version (``handler/contract.py``).
Anything else is an :class:`ArtifactError` that says what to do.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from handler.contract import METADATA_FILE, POSTPROCESS_FILE, RUNTIMES_KEY, ArtifactError, check_metadata
from handler.runtime.device import is_cuda_error, torchscript_executor
from handler.runtime.runtimes import AUTO, choose_runtime, load_backbone

logger = logging.getLogger(__name__)


def _jit_load(path: Path, device: torch.device) -> tuple[torch.jit.ScriptModule, dict]:
    """A TorchScript file of the export and its embedded metadata. A file that is no TorchScript (corrupt,
    truncated) is an :class:`ArtifactError`; a CUDA error while loading stays what it is (a retry may pass)."""
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit.* deprecation notices in torch 2.14
        try:
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except RuntimeError as e:
            if is_cuda_error(e):
                raise
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{path} cannot be loaded as TorchScript ({reason}); export the model again with `python -m export`") from e
    if not extra[METADATA_FILE]:
        raise ArtifactError(f"{path} has no embedded {METADATA_FILE}; re-export it with `python -m export`")
    return module.eval(), json.loads(extra[METADATA_FILE])


def load_artifacts(model_dir: str | Path, device: torch.device, runtime: str = AUTO) -> tuple[Any, torch.jit.ScriptModule, dict]:
    """Load ``postprocess.pt`` and the backbone of ``runtime`` (``handler.runtime``; ``auto``: the export's fastest
    proven runtime that runs here) from ``model_dir`` onto ``device`` and check their metadata. The backbone tells its
    runtime and precision (``handler.runtime.runtimes.runtime_of``)."""
    model_dir = Path(model_dir)
    if not (model_dir / POSTPROCESS_FILE).is_file():
        raise ArtifactError(f"{model_dir / POSTPROCESS_FILE} not found; export the model with `python -m export`")
    torchscript_executor(device)
    postprocess, meta_p = _jit_load(model_dir / POSTPROCESS_FILE, device)
    check_metadata(meta_p, str(model_dir / POSTPROCESS_FILE))
    entry = choose_runtime(runtime, meta_p, model_dir, device)
    backbone, meta_b = load_backbone(entry, model_dir, device, _jit_load)
    # the runtimes list is added after the backbone files are compiled (it holds their measurements), so a .pt2 or an
    # IR carries the metadata without it
    if meta_b is not None and _without_runtimes(meta_b) != _without_runtimes(meta_p):
        raise ArtifactError(f"{entry.files[0]} and {POSTPROCESS_FILE} come from different exports; export both again")
    logger.info("backbone runtime: %s (%s, handler.runtime %s)", entry.label, entry.files[0], runtime)
    return backbone, postprocess, meta_p


def _without_runtimes(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != RUNTIMES_KEY}
