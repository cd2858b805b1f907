#!/usr/bin/env python3
"""Is the TorchServe in this container ready? Exit 0 when a worker of the model is READY, 1 otherwise.

The one health check of the deployment: the Dockerfile's HEALTHCHECK and the Kubernetes probes
(deploy/k8s/deployment.yaml, exec probes) all run ``python3 /opt/yolo/deploy/ready.py``.
``/ping`` is not enough: it answers as soon as the frontend is up, before the model has loaded
(and after its worker died), and with token authorization on it wants the inference key (HTTP 400
without it). This asks the management API ``GET /models/NAME`` and looks for a worker whose status
is ``READY``. A READY worker whose model failed to load for good (a bad setting or file in the archive:
the handler then answers every request with a 503 ``model_load_failed``) is not ready either: its
description, ``GET /models/NAME?customized=true``, carries that error. That describe request waits in the
model's queue like an inference request; when it does not come back within ``--timeout`` the worker is
busy serving (a worker whose model failed to load answers at once), so it counts as ready. ``--live``
only asks whether the frontend answers ``GET /models/NAME`` at all (the liveness probe: TorchServe
restarts a dead worker itself, so a worker that is not READY is no reason to restart the container).

Reads, from the config that deploy/entrypoint.sh rendered (``$YOLO_RUN_DIR/config.properties``):
``management_address`` (``0.0.0.0`` means this host) and ``disable_token_authorization``. With token
authorization on, the management key comes from ``key_file.json`` in TorchServe's working directory
(``$YOLO_RUN_DIR``). Keys expire (``token_expiration_min``, 60 by default): an expired management key
is renewed first with the key file's API key (``GET /token?type=management``), which does not expire.

Standard library only, so the probe costs one short Python process and needs nothing from the project.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

RUN_DIR = Path(os.environ.get("YOLO_RUN_DIR", "/srv/yolo"))
LOAD_FAILED = "model_load_failed"  # the error type of handler.errors.ModelLoadFailed (this file imports nothing of the project)
EXPIRY_MARGIN = timedelta(seconds=10)  # renew a key this close to its expiration


class NotReady(Exception):
    """The model has no READY worker, or the server cannot be asked."""


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def management_url(props: dict[str, str]) -> str:
    """``management_address`` with a wildcard host replaced by loopback (the probe runs in the container)."""
    address = props.get("management_address", "http://127.0.0.1:8081").rstrip("/")
    for wildcard in ("://0.0.0.0", "://[::]"):
        address = address.replace(wildcard, "://127.0.0.1")
    return address


class Busy(NotReady):
    """The request got no answer in time (it waits in the model's queue)."""


def _get(url: str, token: str | None, timeout: float) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except TimeoutError:
        raise Busy(f"{url}: no answer within {timeout:g} s") from None
    except (urllib.error.URLError, OSError) as e:
        if isinstance(getattr(e, "reason", None), TimeoutError):
            raise Busy(f"{url}: no answer within {timeout:g} s") from None
        raise NotReady(f"{url}: {getattr(e, 'reason', e)}") from None


def load_failure(base: str, model: str, token: str | None, timeout: float) -> str | None:
    """The load error the model's worker answers with (``customizedMetadata.error`` of type ``model_load_failed``),
    None when it loaded, or when the describe request waits behind queued requests (then the worker serves)."""
    try:
        _, body = _get(f"{base}/models/{model}?customized=true", token, timeout)
        custom = json.loads(body)[0].get("customizedMetadata")
    except (Busy, ValueError, LookupError, AttributeError, TypeError):  # busy, or a description without our error
        return None
    error = custom.get("error") if isinstance(custom, dict) else None
    if isinstance(error, dict) and error.get("type") == LOAD_FAILED:
        return str(error.get("message", ""))
    return None


def _expired(entry: dict, now: datetime) -> bool:
    stamp = entry.get("expiration time")
    if not stamp:
        return False
    try:
        expires = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return True
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=timezone.utc)
    return now + EXPIRY_MARGIN >= expires


def _keys(key_file: Path) -> dict:
    try:
        return json.loads(key_file.read_text())
    except (OSError, ValueError) as e:
        raise NotReady(f"token authorization is on but {key_file} cannot be read ({e}); TorchServe writes it at start") from None


def management_token(key_file: Path, base: str, timeout: float) -> str:
    """The management key, renewed through the token API first when it has expired."""
    keys = _keys(key_file)
    if _expired(keys.get("management", {}), datetime.now(timezone.utc)):
        status, body = _get(f"{base}/token?type=management", keys.get("API", {}).get("key"), timeout)
        if status != 200:
            raise NotReady(f"the management key expired and renewing it failed: HTTP {status} {body.strip()[:200]}")
        keys = _keys(key_file)
    return keys["management"]["key"]


def check(config: Path, key_file: Path, model: str, timeout: float = 3.0, live: bool = False) -> str:
    """``"yolo: 1 of 1 workers READY"``; raises :class:`NotReady` with the reason otherwise (no READY worker,
    or a model that failed to load).

    ``live``: the frontend describes the model (HTTP 200), READY worker or not.
    """
    try:
        props = read_properties(config)
    except OSError as e:
        raise NotReady(f"{config}: {e.strerror}; deploy/entrypoint.sh writes it when the container starts") from None
    base = management_url(props)
    token_off = props.get("disable_token_authorization", "false").lower() == "true"
    token = None if token_off else management_token(key_file, base, timeout)
    status, body = _get(f"{base}/models/{model}", token, timeout)
    if status != 200:
        raise NotReady(f"GET {base}/models/{model}: HTTP {status} {body.strip()[:200]}")
    try:
        workers = [w for version in json.loads(body) for w in version.get("workers", [])]
    except (ValueError, AttributeError, TypeError):
        raise NotReady(f"GET {base}/models/{model}: not a model description: {body[:200]!r}") from None
    ready = sum(1 for w in workers if w.get("status") == "READY")
    summary = f"{model}: {ready} of {len(workers)} workers READY"
    if live:
        return summary
    if not ready:
        raise NotReady(f"{summary} ({', '.join(str(w.get('status')) for w in workers) or 'no workers'})")
    failure = load_failure(base, model, token, timeout)
    if failure is not None:
        raise NotReady(f"{summary}, but its model failed to load and every request gets 503: {failure}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Exit 0 when a worker of MODEL is READY and its model loaded (TorchServe management API).")
    p.add_argument("--config", type=Path, default=RUN_DIR / "config.properties", help="the running config (default: %(default)s)")
    p.add_argument("--key-file", type=Path, default=RUN_DIR / "key_file.json", help="TorchServe's key file (default: %(default)s)")
    p.add_argument("--model", default=os.environ.get("YOLO_MODEL", "yolo"), help="model name (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per HTTP request (default: %(default)s)")
    p.add_argument("--live", action="store_true", help="liveness: the frontend answers, READY worker or not")
    args = p.parse_args(argv)
    try:
        print(check(args.config, args.key_file, args.model, args.timeout, args.live))
    except NotReady as e:
        print(f"not ready: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
