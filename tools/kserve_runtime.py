"""Run TorchServe locally the way KServe's ``kserve-torchserve`` runtime runs it (dev side, for tests).

From a layout built by :mod:`tools.kserve_store` this starts::

    torchserve --start --model-store=LAYOUT/model-store --ts-config=LAYOUT/config/config.properties

(the runtime's own arguments, :func:`tools.kserve_store.runtime_args`) with the environment KServe puts
on the predictor container for ``protocolVersion: v2`` (``TS_SERVICE_ENVELOPE=kservev2``,
``PROTOCOL_VERSION=v2``). The one change to the layout: a copy whose ``config.properties`` has its
listening addresses on free loopback ports instead of 8085/8082/7070/7071, every other line as built,
so that several servers can run on one machine. Like the KServe wrapper, it sends no token: the
layout's config turns token authorization off.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


from tools.kserve_store import CONFIG_REL, STORE_REL, properties, runtime_args, wrapper_view
from tools.server import TorchServe, _torchserve, free_ports, launch

# What KServe's InferenceService defaulting puts on a TorchServe predictor with protocolVersion v2
# (kserve pkg/apis/serving/v1beta1/inference_service_defaults.go SetTorchServeDefaults, and the
# runtime's env TS_SERVICE_ENVELOPE: "{{.Labels.serviceEnvelope}}").
KSERVE_V2_ENV = {"TS_SERVICE_ENVELOPE": "kservev2", "PROTOCOL_VERSION": "v2"}

_ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address", "grpc_inference_port", "grpc_management_port")


def localized_config(text: str, ports: dict[str, int]) -> str:
    """``text`` with the listening addresses moved to loopback ``ports``; nothing else changes.

    Inference and management share one port, as in the KServe config (8085).
    """
    shared = f"http://127.0.0.1:{ports['inference']}"
    replace = {
        "inference_address": shared,
        "management_address": shared,
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
    }
    missing = [k for k in _ADDRESS_KEYS if k not in properties(text)]
    if missing:
        raise ValueError(f"the KServe config has no {missing}")
    lines = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.startswith("#") and "=" in line and key in replace:
            line = f"{key}={replace[key]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


class KServeLayoutServer(TorchServe):
    """A :class:`tools.server.TorchServe` without token auth (the KServe config turns it off): readiness is
    ``GET /models/NAME`` without a token, what the KServe wrapper polls."""

    token_auth = False


def start_layout_server(layout: Path, workdir: Path, env: dict[str, str] | None = None, timeout: float = 180.0) -> KServeLayoutServer:
    """Start TorchServe from ``layout`` with the runtime's arguments; wait until the snapshot's model is READY.

    ``workdir`` gets the local copy of the layout (``workdir/mnt_models``), the server's cwd, its
    ``TMPDIR``/``TEMP`` and logs. ``env`` adds to (or, with None values, removes from) KServe's v2 env.
    """
    layout, workdir = Path(layout).resolve(), Path(workdir).resolve()
    local = workdir / "mnt_models"
    (local / CONFIG_REL).parent.mkdir(parents=True, exist_ok=True)
    if (local / STORE_REL).exists():
        shutil.rmtree(local / STORE_REL)
    shutil.copytree(layout / STORE_REL, local / STORE_REL)
    names = ("inference", "metrics", "grpc_inference", "grpc_management")
    ports = dict(zip(names, free_ports(len(names))))
    ports["management"] = ports["inference"]
    config_text = localized_config((layout / CONFIG_REL).read_text(), ports)
    (local / CONFIG_REL).write_text(config_text)
    model = wrapper_view(config_text).model_names[0]

    tmpdir = workdir / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    run_env = {k: v for k, v in os.environ.items() if k not in ("TS_CONFIG_FILE", "PYTHONPATH")}
    run_env.update(KSERVE_V2_ENV)
    for key, value in (env or {}).items():
        if value is None:
            run_env.pop(key, None)
        else:
            run_env[key] = value
    run_env.update(TMPDIR=str(tmpdir), TEMP=str(tmpdir), LOG_LOCATION=str(workdir / "logs"), METRICS_LOCATION=str(workdir / "logs"))
    server = KServeLayoutServer(workdir, tmpdir, model, ports, run_env)
    return launch(server, [_torchserve(), *runtime_args(local)[1:]], timeout)


def running_layout_server(layout: Path, workdir: Path, **kwargs) -> KServeLayoutServer:
    """``with running_layout_server(layout, tmp) as server:`` — stopped on exit."""
    return start_layout_server(layout, workdir, **kwargs)
