"""Which runtime runs the backbone in this worker: model-config.yaml ``handler: runtime: auto | torchscript | aoti |
openvino``, and the runtimes the export proved (metadata ``runtimes``, fastest first).

- ``torchscript``: the traced ``backbone.pt``, in every archive, the reference every other runtime is checked against.
- ``aoti``: ``backbone.pt2`` (``handler/runtime/aoti.py``), refused on a CPU without the export CPU's ISA flags.
- ``openvino``: ``backbone.xml`` + ``.bin`` (``handler/runtime/openvino.py``), with the precision the export proved.

``auto`` (the default) takes the first runtime of the export's list that is installed and usable here: its files are
in the model directory, its package imports, the CPU has what it needs (ISA flags, BF16), and the worker is on CPU
(OpenVINO and a CPU ``.pt2`` do not run on CUDA). A runtime skipped is logged with its reason. An export without the
list (before runtimes, or a task without them) runs its format's backbone, as before. An explicit value always wins:
it runs that runtime or fails the load with one line that says why and what to do.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from handler.contract import (  # noqa: F401 - RUNTIME_SETTINGS for callers
    AOTI_FORMAT,
    AOTI_RUNTIME,
    AUTO_RUNTIME as AUTO,
    OPENVINO_RUNTIME,
    RUNTIME_FILES,
    RUNTIME_SETTINGS,
    RUNTIMES_KEY,
    TORCHSCRIPT_RUNTIME,
    ArtifactError,
)
from handler.runtime import cpu_flags

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeEntry:
    """One runtime the export proved: what runs, at which precision, from which files, how fast it was there."""

    runtime: str
    precision: str = "fp32"
    files: tuple[str, ...] = ()
    # the export's measurement: p50 ms of the raw forward at its imgsz, by thread count ({"1": 34.2, "2": 21.8})
    forward_ms: tuple[tuple[str, float], ...] | None = None
    cpu_flags: tuple[str, ...] | None = None  # aoti: the export CPU's ISA flags, all needed by the compiled code

    @classmethod
    def from_dict(cls, d: dict) -> "RuntimeEntry":
        flags, ms = d.get("cpu_flags"), d.get("forward_ms")
        return cls(d["runtime"], d.get("precision", "fp32"), tuple(d.get("files") or RUNTIME_FILES[d["runtime"]]),
                   tuple(ms.items()) if isinstance(ms, dict) else None, tuple(flags) if flags is not None else None)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["files"] = list(self.files)
        d["forward_ms"] = dict(self.forward_ms) if self.forward_ms is not None else None
        if self.cpu_flags is None:
            del d["cpu_flags"]
        else:
            d["cpu_flags"] = list(self.cpu_flags)
        return d

    @property
    def measured(self) -> str:
        """``"34.2 ms at 1 thread, 21.8 ms at 2"``, or ``"not measured"``."""
        if not self.forward_ms:
            return "not measured"
        parts = [f"{ms:.1f} ms at {t}" for t, ms in self.forward_ms]
        return ", ".join(parts) + (" threads" if self.forward_ms[-1][0] != "1" else " thread")

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.precision}"


def proven_runtimes(meta: dict) -> list[RuntimeEntry]:
    """The export's runtimes, fastest first; without the ``runtimes`` key, the format's backbone (and for an aoti
    export the traced backbone after it)."""
    if RUNTIMES_KEY in meta:
        return [RuntimeEntry.from_dict(d) for d in meta[RUNTIMES_KEY]]
    torchscript = RuntimeEntry(TORCHSCRIPT_RUNTIME, files=tuple(RUNTIME_FILES[TORCHSCRIPT_RUNTIME]))
    if meta.get("format") == AOTI_FORMAT:
        return [RuntimeEntry(AOTI_RUNTIME, meta.get("precision", "fp32"), (meta["backbone"],)), torchscript]
    return [torchscript]


def unusable(entry: RuntimeEntry, model_dir: Path, device: torch.device) -> str | None:
    """Why ``entry`` cannot run in this worker, or None when it can."""
    for name in entry.files:
        if not (model_dir / name).is_file():
            return f"{name} is not in {model_dir}"
    if entry.runtime == TORCHSCRIPT_RUNTIME:
        return None
    if device.type != "cpu" and (entry.runtime == OPENVINO_RUNTIME or entry.cpu_flags is not None):
        return f"the {entry.runtime} backbone runs on CPU and this worker is on {device}"
    if entry.runtime == OPENVINO_RUNTIME:
        from handler.runtime.openvino import import_openvino

        try:
            import_openvino()
        except ImportError as e:
            return str(e)
    lacking = cpu_flags.missing(list(entry.cpu_flags or ()))
    if lacking:
        return f"backbone.pt2 needs {' '.join(lacking)}, which this CPU lacks"
    if entry.precision == "bf16" and not cpu_flags.has_bf16():
        return f"BF16 needs {' or '.join(cpu_flags.BF16_FLAGS)}, which this CPU lacks"
    return None


def choose_runtime(setting: str, meta: dict, model_dir: Path, device: torch.device) -> RuntimeEntry:
    """The runtime this worker loads for ``setting`` (``handler.runtime``). Raises :class:`ArtifactError` (one line)
    when an explicit runtime is not in the export or cannot run here."""
    proven = proven_runtimes(meta)
    if setting != AUTO:
        entry = next((e for e in proven if e.runtime == setting), None)
        if entry is None and setting == TORCHSCRIPT_RUNTIME:  # the reference is in every export
            entry = RuntimeEntry(TORCHSCRIPT_RUNTIME, files=tuple(RUNTIME_FILES[TORCHSCRIPT_RUNTIME]))
        if entry is None:
            have = ", ".join(e.runtime for e in proven)
            raise ArtifactError(f"runtime: {setting}: this export has no {setting} backbone (it has {have}); export with "
                                f"`python -m export --runtimes {setting}` or choose one of those")
        why = unusable(entry, model_dir, device)
        if why:
            raise ArtifactError(f"runtime: {setting}: {why}")
        return entry
    reasons = []
    for entry in proven:
        why = unusable(entry, model_dir, device)
        if why is None:
            return entry
        logger.warning("runtime auto: skipping %s (%s)", entry.label, why)
        reasons.append(f"{entry.label}: {why}")
    raise ArtifactError(f"runtime auto: no runtime of this export can run here ({'; '.join(reasons)}); "
                        "export the model again with `python -m export`")


def load_backbone(entry: RuntimeEntry, model_dir: Path, device: torch.device, load_torchscript) -> tuple[object, dict | None]:
    """Load ``entry``'s backbone; returns it and the export metadata embedded in its files (None: the file has
    none). ``load_torchscript(path, device) -> (module, metadata)`` loads a TorchScript file."""
    path = model_dir / entry.files[0]
    if entry.runtime == TORCHSCRIPT_RUNTIME:
        return load_torchscript(path, device)
    if entry.runtime == AOTI_RUNTIME:
        from handler.runtime.aoti import load_aoti_backbone  # imports Inductor: only for .pt2 backbones

        try:
            return load_aoti_backbone(path, device, list(entry.cpu_flags) if entry.cpu_flags else None, entry.precision)
        except ValueError as e:
            raise ArtifactError(str(e)) from None
    from handler.runtime.openvino import load_openvino_backbone

    try:
        return load_openvino_backbone(path, entry.precision, torch.get_num_threads())
    except ImportError as e:
        raise ArtifactError(str(e)) from None


def runtime_of(backbone) -> tuple[str, str]:
    """(runtime, precision) of a loaded backbone; a TorchScript module is the fp32 reference."""
    return getattr(backbone, "runtime", TORCHSCRIPT_RUNTIME), getattr(backbone, "precision", "fp32")
