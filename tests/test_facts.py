"""Facts that must stand in more than one file (a deploy file, the package metadata) agree with their one home."""

from __future__ import annotations

import importlib
import tomllib

import pytest

from tools.server import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
CONSOLE_SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]


@pytest.mark.parametrize("command", sorted(CONSOLE_SCRIPTS))
def test_help_names_the_console_script(command, capsys):
    """``yolo-ts-export --help`` says ``usage: yolo-ts-export``, the name the user typed, not ``python -m export``."""
    module, function = CONSOLE_SCRIPTS[command].split(":")
    with pytest.raises(SystemExit) as exit_:
        getattr(importlib.import_module(module), function)(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {command} ")


def test_package_description_names_every_served_task():
    from handler.tasks import TASKS

    description = PYPROJECT["project"]["description"].lower().replace("-", "")
    missing = [name for name in TASKS if name not in description]
    assert not missing, f"pyproject.toml's description does not name the served task(s) {missing}"


@pytest.mark.parametrize("config", ["config.properties", "deploy/kserve/config.properties"])
def test_response_limit_is_the_handlers(config):
    """TorchServe's ``max_response_size`` is the limit the handler sizes its largest answers to (depth float32)."""
    from handler.response import MAX_RESPONSE_BYTES
    from tools.kserve_store import properties

    assert int(properties((REPO_ROOT / config).read_text())["max_response_size"]) == MAX_RESPONSE_BYTES


def test_kserve_snapshot_carries_the_archives_batching():
    """deploy/kserve/config.properties' model_snapshot overrides the archive's worker and batching keys, so it must
    say what ``python -m export --archive`` writes for a CPU model (``tools.kserve_store`` rewrites it per archive)."""
    import json

    import yaml

    from export.archive import model_config_yaml
    from tools.kserve_store import SNAPSHOT_KEY, properties

    snapshot = json.loads(properties((REPO_ROOT / "deploy/kserve/config.properties").read_text())[SNAPSHOT_KEY])
    (versions,) = snapshot["models"].values()
    (entry,) = versions.values()
    archive = yaml.safe_load(model_config_yaml(device="cpu"))
    keys = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")
    assert {k: entry[k] for k in keys} == {k: archive[k] for k in keys}


def test_archives_write_every_key_the_kserve_snapshot_takes():
    """tools/kserve_store.py falls back to TorchServe's own register defaults (batch 1, 100 ms) only for a foreign
    archive that leaves a key out; ours write them all, so the fallback never replaces the shipped batching."""
    import yaml

    from export.archive import model_config_yaml
    from tools.kserve_store import _DEFAULTS

    assert set(_DEFAULTS) <= set(yaml.safe_load(model_config_yaml()))
