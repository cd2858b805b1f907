"""Build the storage layout KServe's TorchServe runtime expects, from our ``.mar``.

KServe mounts an InferenceService's ``storageUri`` at ``/mnt/models``; its ``kserve-torchserve``
runtime (kserve ``config/runtimes/kserve-torchserve.yaml``) starts::

    torchserve --start --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties

and the KServe wrapper reads the same ``config.properties``. So the storage holds::

    DIR/config/config.properties   deploy/kserve/config.properties, model_snapshot written for this archive
    DIR/model-store/NAME.mar       the archive

Usage (then copy DIR to the bucket or volume the ``storageUri`` names)::

    python -m tools.kserve_store --mar model_store/yolo.mar --out DIR

The ``model_snapshot`` line names the model (the v2 URL is ``/v2/models/NAME/infer``) and carries
the archive's own ``minWorkers``, ``maxWorkers``, ``batchSize``, ``maxBatchDelay`` and
``responseTimeout`` from its ``model-config.yaml``: TorchServe takes those values from a snapshot,
not from the archive, so writing them from the archive keeps the two from disagreeing (the handler
divides the CPUs by the archive's ``maxWorkers``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
KSERVE_CONFIG = REPO_ROOT / "deploy" / "kserve" / "config.properties"

MOUNT = Path("/mnt/models")  # where KServe's storage initializer puts the storageUri
CONFIG_REL = Path("config") / "config.properties"
STORE_REL = Path("model-store")
SNAPSHOT_KEY = "model_snapshot"


def runtime_args(layout: Path = MOUNT) -> list[str]:
    """The ``kserve-torchserve`` ClusterServingRuntime's container args, for a layout at ``layout``."""
    return ["torchserve", "--start", f"--model-store={layout / STORE_REL}", f"--ts-config={layout / CONFIG_REL}"]


# For keys an archive's model-config.yaml leaves out: TorchServe's register defaults (batch 1, 100 ms,
# 120 s) and one worker. Archives from export/archive.py always write all five.
_DEFAULTS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 100, "responseTimeout": 120}


@dataclass(frozen=True)
class ArchiveModel:
    """What the snapshot needs from a ``.mar``: its name, version and worker/batching settings."""

    name: str
    version: str
    mar_name: str
    min_workers: int
    max_workers: int
    batch_size: int
    max_batch_delay_ms: int
    response_timeout_s: int

    def snapshot(self) -> dict:
        """TorchServe's ``model_snapshot`` JSON for this one model (the KServe samples' shape)."""
        entry = {
            "defaultVersion": True,
            "marName": self.mar_name,
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
        }
        return {"name": "startup.cfg", "modelCount": 1, "models": {self.name: {self.version: entry}}}


def read_archive(mar: Path) -> ArchiveModel:
    """Name, version and settings of a ``.mar`` (a zip: ``MAR-INF/MANIFEST.json`` + its ``configFile``)."""
    mar = Path(mar)
    if not mar.is_file():
        raise ValueError(f"{mar} not found; build it with `python -m export ...` (README) first")
    try:
        with zipfile.ZipFile(mar) as z:
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
            model = manifest["model"]
            config_file = model.get("configFile")
            config = yaml.safe_load(z.read(config_file)) if config_file else {}
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(
            f"{mar} is not a torch-model-archiver .mar with MAR-INF/MANIFEST.json ({type(e).__name__}: {e}); "
            "build it with the default --archive-format"
        ) from None
    config = config or {}

    def setting(key: str) -> int:
        value = config.get(key, _DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{mar}: model-config.yaml {key}: {value!r} is not a non-negative integer")
        return value

    return ArchiveModel(
        name=model["modelName"],
        version=str(model.get("modelVersion") or "1.0"),
        mar_name=mar.name,
        min_workers=setting("minWorkers"),
        max_workers=setting("maxWorkers"),
        batch_size=setting("batchSize"),
        max_batch_delay_ms=setting("maxBatchDelay"),
        response_timeout_s=setting("responseTimeout"),
    )


def properties(text: str) -> dict[str, str]:
    """``key=value`` lines (comments and blanks skipped), the way the KServe wrapper reads the file."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def with_snapshot(config_text: str, model: ArchiveModel) -> str:
    """``config_text`` with its ``model_snapshot`` line replaced by the snapshot of ``model``."""
    line = f"{SNAPSHOT_KEY}={json.dumps(model.snapshot(), separators=(',', ':'))}"
    lines = config_text.splitlines()
    found = [i for i, text in enumerate(lines) if text.split("=", 1)[0].strip() == SNAPSHOT_KEY]
    if len(found) != 1:
        raise ValueError(f"the KServe config must have exactly one {SNAPSHOT_KEY}= line, found {len(found)}")
    lines[found[0]] = line
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class WrapperView:
    """What the KServe wrapper (kserve_wrapper/__main__.py ``parse_config``) derives from the config."""

    model_names: list[str]
    predictor_host: str  # where it sends REST requests: inference_address without the scheme
    management_address: str  # readiness: GET {management_address}/models/NAME
    grpc_inference_address: str  # host:port for protocolVersion grpc-v2
    model_store: str


def wrapper_view(config_text: str) -> WrapperView:
    """The wrapper's own parsing, step for step (defaults as in the wrapper)."""
    props = properties(config_text)
    snapshot = json.loads(props.get(SNAPSHOT_KEY, "{}"))
    inference = props.get("inference_address", "http://127.0.0.1:8085")
    management = props.get("management_address", "http://127.0.0.1:8085")
    grpc_port = props.get("grpc_inference_port", "7070")
    names = list(snapshot.get("models", {}).keys()) or ["model"]
    grpc = (inference.split(":")[1] + ":" + grpc_port).replace("/", "")
    return WrapperView(names, inference.split("//")[1], management, grpc, props.get("model_store", "/mnt/models/model-store"))


def build_layout(mar: Path, out: Path, config: Path = KSERVE_CONFIG) -> ArchiveModel:
    """Write ``out/config/config.properties`` and ``out/model-store/NAME.mar``; returns what the snapshot names."""
    model = read_archive(mar)
    text = with_snapshot(Path(config).read_text(), model)
    out = Path(out)
    (out / CONFIG_REL).parent.mkdir(parents=True, exist_ok=True)
    (out / STORE_REL).mkdir(parents=True, exist_ok=True)
    others = [p.name for p in (out / STORE_REL).glob("*.mar") if p.name != model.mar_name]
    if others:
        raise ValueError(f"{out / STORE_REL} already holds {others}; the snapshot names only {model.mar_name}: use an empty --out")
    (out / CONFIG_REL).write_text(text)
    shutil.copyfile(mar, out / STORE_REL / model.mar_name)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.kserve_store", description=__doc__.split("\n\n")[0])
    p.add_argument("--mar", type=Path, required=True, help="the model archive, e.g. model_store/yolo.mar")
    p.add_argument("--out", type=Path, required=True, help="the layout directory to write (the storageUri's content)")
    p.add_argument("--config", type=Path, default=KSERVE_CONFIG, help="template config.properties (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        model = build_layout(args.mar, args.out, args.config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out / CONFIG_REL}\n{args.out / STORE_REL / model.mar_name}")
    print(f"model {model.name!r} version {model.version}: POST /v2/models/{model.name}/infer through the KServe wrapper")
    return 0


if __name__ == "__main__":
    sys.exit(main())
