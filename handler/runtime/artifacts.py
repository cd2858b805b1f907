"""Loading the exported files of a model directory (an export directory, or the model directory of a ``.mar``).

``backbone.pt`` (TorchScript) or ``backbone.pt2`` (AOTInductor, when the metadata says ``"format": "aoti"``), and
``postprocess.pt``, each with its embedded ``metadata.json``; the two must come from one export, and the metadata
must be of this handler's contract version (``handler/contract.py``). Anything else is an :class:`ArtifactError`
that says what to do.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from handler.contract import AOTI_FORMAT, BACKBONE_FILE, METADATA_FILE, POSTPROCESS_FILE, ArtifactError, check_metadata
from handler.runtime.device import is_cuda_error


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


def load_artifacts(model_dir: str | Path, device: torch.device) -> tuple[Any, torch.jit.ScriptModule, dict]:
    """Load the backbone (``backbone.pt``, or ``backbone.pt2`` when the metadata says ``"format": "aoti"``) and
    ``postprocess.pt`` from ``model_dir`` onto ``device`` and check their metadata."""
    model_dir = Path(model_dir)
    if not (model_dir / POSTPROCESS_FILE).is_file():
        raise ArtifactError(f"{model_dir / POSTPROCESS_FILE} not found; export the model with `python -m export`")
    postprocess, meta_p = _jit_load(model_dir / POSTPROCESS_FILE, device)
    backbone_file = meta_p.get("backbone", BACKBONE_FILE)  # the metadata names the backbone's format and file
    if not (model_dir / backbone_file).is_file():
        raise ArtifactError(f"{model_dir / backbone_file} not found; export the model with `python -m export`")
    if meta_p.get("format") == AOTI_FORMAT:
        from handler.runtime.aoti import load_aoti_backbone  # imports Inductor: only for .pt2 exports

        try:
            backbone, meta_b = load_aoti_backbone(model_dir / backbone_file, device)
        except ValueError as e:
            raise ArtifactError(str(e)) from None
    else:
        backbone, meta_b = _jit_load(model_dir / backbone_file, device)
    if meta_b != meta_p:
        raise ArtifactError(f"{backbone_file} and {POSTPROCESS_FILE} come from different exports; export both again")
    return backbone, postprocess, check_metadata(meta_p, str(model_dir / POSTPROCESS_FILE))
