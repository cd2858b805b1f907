"""Secure defaults: the shipped config.properties, token authorization and key expiry on a real
TorchServe, the model API off, and no unpickling anywhere on the serving side."""

from __future__ import annotations

import ast
import json
import pickle
import time

import pytest
import requests

from tools.server import REPO_CONFIG, REPO_ROOT, TorchServe, running_server
from tools.client import is_token_rejected, predict_with_key_file, renew_token
from serving_support import build_test_store
from tiers import slow_fixture

HANDLER_DIR = REPO_ROOT / "handler"
EXPIRY_MIN = 0.1  # 6 s: TorchServe reads token_expiration_min as a decimal number of minutes


def shipped_config() -> dict[str, str]:
    props = {}
    for line in REPO_CONFIG.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


# ---------------------------------------------------------------- the shipped config.properties


def test_every_address_is_loopback():
    props = shipped_config()
    addresses = {k: v for k, v in props.items() if k.endswith("_address")}
    assert {"inference_address", "management_address", "metrics_address", "grpc_inference_address", "grpc_management_address"} <= set(addresses)
    for key, value in addresses.items():
        host = value.split("://", 1)[-1].rsplit(":", 1)[0] if "://" in value else value
        assert host == "127.0.0.1", f"{key}={value} is not loopback"


def test_token_auth_on_and_model_api_off_by_config():
    props = shipped_config()
    assert props.get("disable_token_authorization", "false").lower() == "false"
    assert props.get("enable_model_api", "false").lower() == "false"
    assert props.get("enable_envvars_config", "false").lower() == "false"  # environment variables cannot undo the above


def test_allowed_urls_is_local_files_only():
    allowed = shipped_config()["allowed_urls"]
    assert allowed == "file://.*", allowed
    assert "http" not in allowed


def test_request_and_response_size_limits_are_set():
    props = shipped_config()
    request, response = int(props["max_request_size"]), int(props["max_response_size"])
    assert 0 < request <= 32 * 2**20 and 0 < response <= 32 * 2**20


# ---------------------------------------------------------------- serving never unpickles


def test_handler_code_never_calls_an_unpickler():
    forbidden = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}
    for path in HANDLER_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {n.split(".")[0] for n in names} & forbidden, f"{path.name} imports {names}"
            if isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name):
                assert node.value.id not in ("torch", "np", "numpy"), f"{path.name}:{node.lineno} calls {node.value.id}.load"


def test_worker_loads_and_serves_with_every_unpickler_broken(pose_export, sample_images, monkeypatch):
    """initialize() and a request with pickle and torch.load raising: the handler uses TorchScript only."""
    import torch

    from handler.yolo_handler import YoloHandler
    from serving_support import make_context, run_batch

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:1])
        raise AssertionError("serving tried to unpickle")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse(*args)

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    ctx = make_context(pose_export.out_dir, {"warmup": 1, "torch_threads": 1})
    h = YoloHandler()
    h.initialize(ctx)
    (body,), statuses = run_batch(h, ctx, [{"body": bytearray(sample_images[0].read_bytes())}])
    assert statuses == [200] and body["detections"]
    assert calls == []


def test_export_warns_that_a_pt_checkpoint_is_unpickled(tmp_path, capsys):
    from export.__main__ import main

    fake = tmp_path / "someone_elses.pt"
    fake.write_bytes(b"not a checkpoint")
    assert main(["--weights", str(fake), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "runs Python pickle" in err and "only weights you trust" in err
    assert main(["--weights", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "pickle" not in capsys.readouterr().err  # a .yaml builds a model; nothing is unpickled
    image = tmp_path / "bus.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0 not a checkpoint")
    for weights in (image, tmp_path / "missing.pt", tmp_path):  # refused before anything is unpickled
        assert main(["--weights", str(weights), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "pickle" not in err and "error:" in err, (weights, err)


# ---------------------------------------------------------------- a real TorchServe: tokens and the model API


@slow_fixture(scope="module")
def short_key_server(pose_export, tmp_path_factory):
    """The shipped config with keys that expire after 6 s. Readiness polling renews the management key
    with the API key whenever it has expired: the recovery path the client uses for the inference key."""
    store = build_test_store(pose_export.out_dir, tmp_path_factory, "security_store", {"torch_threads": 1, "warmup": 0})
    work = tmp_path_factory.mktemp("security_server")
    config = work / "short_keys.properties"
    config.write_text(REPO_CONFIG.read_text() + f"\ntoken_expiration_min={EXPIRY_MIN}\n")
    describe = TorchServe.describe_model

    def describe_renewing(self):
        try:
            return describe(self)
        except requests.HTTPError as e:
            if not is_token_rejected(e.response):
                raise
            renew_token(self.key_file, self.management_url, "management")
            return describe(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TorchServe, "describe_model", describe_renewing)
        with running_server(store, work / "run", config=config) as server:
            yield server


def test_requests_without_the_right_key_are_rejected(short_key_server, sample_images):
    s = short_key_server
    renew_token(s.key_file, s.management_url, "inference")
    renew_token(s.key_file, s.management_url, "management")
    bus = sample_images[0].read_bytes()
    image = {"Content-Type": "image/jpeg"}
    for name, headers in {
        "no token": image,
        "wrong token": {**image, "Authorization": "Bearer wrong"},
        "management key on the inference API": {**image, **s.headers("management")},
        "API key on the inference API": {**image, "Authorization": f"Bearer {json.loads(s.key_file.read_text())['API']['key']}"},
    }.items():
        r = requests.post(s.predictions_url, data=bus, headers=headers, timeout=60)
        assert is_token_rejected(r), f"{name}: HTTP {r.status_code} {r.text[:200]}"
    r = requests.get(f"{s.management_url}/models/yolo", headers=s.headers("inference"), timeout=10)
    assert is_token_rejected(r), "the inference key opened the management API"
    r = requests.get(f"{s.metrics_url}/metrics", timeout=10)
    assert r.status_code == 200  # metrics stay readable on loopback (no model data in them)


def test_model_api_is_off(short_key_server):
    s = short_key_server
    renew_token(s.key_file, s.management_url, "management")
    r = requests.post(f"{s.management_url}/models", params={"url": "yolo.mar"}, headers=s.headers("management"), timeout=10)
    assert r.status_code == 405, r.text
    r = requests.delete(f"{s.management_url}/models/yolo", headers=s.headers("management"), timeout=10)
    assert r.status_code == 405, r.text


def test_an_expired_key_is_rejected_and_the_client_recovers(short_key_server, sample_images):
    s = short_key_server
    bus = sample_images[0].read_bytes()
    key = renew_token(s.key_file, s.management_url, "inference")  # valid for EXPIRY_MIN from now
    r = requests.post(s.predictions_url, data=bus, headers={"Authorization": f"Bearer {key}", "Content-Type": "image/jpeg"}, timeout=120)
    assert r.status_code == 200, r.text
    time.sleep(EXPIRY_MIN * 60 + 1.5)
    r = requests.post(s.predictions_url, data=bus, headers={"Authorization": f"Bearer {key}", "Content-Type": "image/jpeg"}, timeout=120)
    assert is_token_rejected(r), f"an expired key was accepted: HTTP {r.status_code}"
    r = predict_with_key_file(bus, s.key_file, s.predictions_url, s.management_url)
    assert r.status_code == 200, r.text
    assert s.key() != key  # the client renewed the key, and key_file.json holds the new one
