"""``python -m tools.rollout``: replace the served model by a new version under load, or roll back.

    python -m tools.rollout --mar model_store/yolo-2.0.mar --server http://127.0.0.1:8081 --key-file key_file.json
    python -m tools.rollout --rollback --model yolo --server http://127.0.0.1:8081 --key-file key_file.json
    python -m tools.rollout --retire 1.0 --model yolo        # drain and unregister a version that is not the default

A rollout, in this order; any failure stops it with one ``error:`` line (exit 1), unregisters the new
version if it was registered, and leaves the serving version untouched, so no request fails:

1. read the new archive locally: its manifest (model name, version) and ``metadata.json`` (contract
   version, task, class names) must fit the handler and the serving version (another task only with
   ``--allow-task-change``);
2. register it beside the serving version (``POST /models?url=FILE&initial_workers=N``; FILE is the
   archive's name inside the server's model store, never a URL);
3. wait until its workers are READY (the management API), at most ``--timeout`` seconds; a model that
   cannot load (a corrupt ``backbone.pt``, a bad setting: its worker answers every request with a 503
   ``model_load_failed``, which its description carries) or a worker that dies while loading stops the
   rollout at once;
4. send the new version its own smoke request (``POST /predictions/NAME/VERSION`` with a real image)
   and check the answer against the archive's metadata (task, class names, version);
5. make it the default (``PUT /models/NAME/VERSION/set-default``); new requests now reach it;
6. drain the previous version, then unregister it (:func:`retire`), or keep it for ``--rollback``
   (``--keep-previous``).

Draining goes by what is left, not by a clock. TorchServe 0.12 answers no request still queued on a version
when it unregisters it, and answers the batch its worker holds with 500 "Worker scaled down."
(docs/torchserve.md, "Unregistering a version that has requests"). So :func:`drain` waits until the version's
queue is empty (``jobQueueStatus.pendingRequests`` of ``GET /models/NAME/VERSION``) and each of its workers
has answered a describe request sent after that (a describe request goes through the same queue, and a worker
takes it only after it has answered the batch it held). If that takes longer than ``--drain-timeout``, the
previous version is not unregistered: it stays registered (not the default) so that nothing queued on it is
lost, the tool says how many requests were left, and exits 3; ``--retire VERSION`` finishes the job later.

``--rollback`` makes the other registered version the default again (``--to VERSION`` when several).

This needs the model API (``enable_model_api=true``), which the shipped config.properties keeps off: serve
with ``yolo-ts-serve --enable-rollout``, which turns it on for that run only (loopback and token auth as
configured, archives only from the model store); the README ("Rolling out a new model") says what it trades.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import requests

from handler.contract import CONTRACT_VERSION, METADATA_FILE
from handler.errors import ModelLoadFailed

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_DRAINED = 3  # the new version serves; the previous one still had requests and stays registered
MANIFEST = "MAR-INF/MANIFEST.json"
DRAIN_POLL_S = 0.25  # how often the queue of a draining version is read
DRAIN_BARRIERS = 2  # describe requests answered with an empty queue before a version counts as drained


class RolloutError(RuntimeError):
    """The rollout stopped; the serving version is unchanged."""


class NotDrained(RuntimeError):
    """A version still had requests when ``--drain-timeout`` ran out; it stays registered, so none is lost."""

    def __init__(self, message: str, drain: "Drain") -> None:
        super().__init__(message)
        self.drain = drain


@dataclass(frozen=True)
class Archive:
    """What a .mar says about itself, read without loading it."""

    path: Path
    name: str
    version: str
    metadata: dict

    @classmethod
    def read(cls, path: Path) -> "Archive":
        try:
            with zipfile.ZipFile(path) as z:
                manifest = json.loads(z.read(MANIFEST))
                metadata = json.loads(z.read(METADATA_FILE))
        except FileNotFoundError:
            raise RolloutError(f"{path} not found") from None
        except (zipfile.BadZipFile, KeyError, ValueError) as e:
            raise RolloutError(f"{path} is not a model archive of this project ({e}); build it with `python -m export --archive`") from None
        model = manifest.get("model", {})
        return cls(path, model.get("modelName", ""), str(model.get("modelVersion", "")), metadata)


class Management:
    """The TorchServe management API, with the management key from key_file.json."""

    def __init__(self, url: str, key_file: Path | None, timeout: float = 30.0) -> None:
        self.url, self.key_file, self.timeout = url.rstrip("/"), key_file, timeout

    def _headers(self) -> dict[str, str]:
        if self.key_file is None or not self.key_file.is_file():
            return {}
        return {"Authorization": f"Bearer {json.loads(self.key_file.read_text())['management']['key']}"}

    def call(self, method: str, path: str, timeout: float | None = None, **kwargs) -> requests.Response:
        try:
            r = requests.request(method, f"{self.url}{path}", headers=self._headers(), timeout=timeout or self.timeout, **kwargs)
        except requests.RequestException as e:
            raise RolloutError(f"the management API at {self.url} does not answer ({type(e).__name__}); is TorchServe running?") from None
        if r.status_code == 405:
            raise RolloutError(
                "the model API is off on this server (405); a rollout needs it: restart the server with "
                "`yolo-ts-serve --enable-rollout` (the model API on for that run only, management API on loopback, "
                "token auth on; README, \"Rolling out a new model\")"
            )
        if r.status_code in (400, 401, 403) and "InvalidKeyException" in r.text:
            raise RolloutError(f"the management key in {self.key_file} is rejected; renew it (see the README, tokens)")
        return r

    def versions(self, name: str) -> list[dict]:
        """Every registered version of ``name`` (``GET /models/NAME/all``), [] when it is not registered."""
        r = self.call("GET", f"/models/{name}/all")
        return r.json() if r.status_code == 200 else []

    def default_version(self, name: str) -> str | None:
        """The version ``/predictions/NAME`` reaches: ``GET /models/NAME`` describes the default version
        (TorchServe's describe has no default flag)."""
        r = self.call("GET", f"/models/{name}")
        return str(r.json()[0]["modelVersion"]) if r.status_code == 200 else None

    def describe(self, name: str, version: str, timeout: float | None = None) -> dict:
        """``GET /models/NAME/VERSION?customized=true``: TorchServe's description with the handler's own in
        ``customizedMetadata`` (the load error, with a 503, for a model that failed to load). The request waits
        in the version's queue like an inference request."""
        r = self.call("GET", f"/models/{name}/{version}", timeout=timeout, params={"customized": "true"})
        try:
            description = r.json()[0]
        except (ValueError, LookupError, AttributeError, TypeError):
            description = None
        if not isinstance(description, dict):
            raise RolloutError(f"{name} {version}: no description ({r.status_code}: {r.text.strip()[:200]})")
        if r.status_code != 200 and not ModelLoadFailed.message_in(_custom(description)):
            raise RolloutError(f"{name} {version} is not registered ({r.status_code}: {r.text.strip()[:200]})")
        return description

    def load_failure(self, name: str, version: str) -> str | None:
        """The load error ``name`` ``version`` answers every request with, None when its model loaded."""
        return ModelLoadFailed.message_in(_custom(self.describe(name, version)))

    def queue(self, name: str, version: str) -> tuple[int, set[int]] | None:
        """``(requests waiting in its queue, its worker PIDs)`` (``GET /models/NAME/VERSION``), None when that
        version is not registered. A batch a worker holds is no longer in the queue."""
        r = self.call("GET", f"/models/{name}/{version}")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise RolloutError(f"{name} {version}: the management API answered {r.status_code}: {r.text.strip()[:200]}")
        description = r.json()[0]
        pids = {w["pid"] for w in description.get("workers", []) if isinstance(w.get("pid"), int) and w["pid"] > 0}
        return int(description["jobQueueStatus"]["pendingRequests"]), pids


def _custom(description: dict) -> dict | None:
    """The handler's part of a description (TorchServe parses the handler's JSON text when it can)."""
    custom = description.get("customizedMetadata")
    if isinstance(custom, str):
        try:
            custom = json.loads(custom)
        except ValueError:
            return None
    return custom if isinstance(custom, dict) else None


def _served_task(mgmt: Management, name: str, version: str) -> str | None:
    """The task the serving version declares in its description (None when it gives none, e.g. it failed to load)."""
    custom = _custom(mgmt.describe(name, version)) or {}
    return custom.get("task")


def check_archive(new: Archive, serving_task: str | None, registered: list[str], allow_task_change: bool) -> None:
    """Step 1: refuse an archive that the handler or the serving version would not take."""
    meta = new.metadata
    if meta.get("contract") != CONTRACT_VERSION:
        raise RolloutError(
            f"{new.path.name} has contract version {meta.get('contract')}, this handler reads {CONTRACT_VERSION}; "
            "re-export it with the matching `python -m export`"
        )
    if new.version in registered:
        raise RolloutError(f"version {new.version} of {new.name!r} is already registered; export with another --version")
    if serving_task is not None and meta.get("task") != serving_task and not allow_task_change:
        raise RolloutError(
            f"{new.path.name} is a {meta.get('task')} model, the serving version is {serving_task}: clients would get another "
            "response schema. Pass --allow-task-change if that is intended"
        )


def wait_ready(mgmt: Management, name: str, version: str, timeout: float) -> float:
    """Step 3: seconds until a worker of ``name`` ``version`` is READY; raises when it dies or times out."""
    t0 = time.monotonic()
    pids: set[int] = set()
    while time.monotonic() - t0 < timeout:
        r = mgmt.call("GET", f"/models/{name}/{version}")
        if r.status_code == 500 and "Worker died" in r.text:  # TorchServe's answer while the worker crash-loops
            raise RolloutError(f"{name} {version}: its worker died while loading (see logs/model_log.log); a broken archive?")
        if r.status_code != 200:
            raise RolloutError(f"{name} {version} is not registered ({r.status_code}: {r.text.strip()[:200]})")
        workers = r.json()[0].get("workers", [])
        if any(w.get("status") == "READY" for w in workers):
            failure = mgmt.load_failure(name, version)
            if failure is not None:  # the worker is up, and answers every request with this error
                raise RolloutError(f"{name} {version} cannot serve: {failure}")
            return time.monotonic() - t0
        pids |= {w["pid"] for w in workers if isinstance(w.get("pid"), int) and w["pid"] > 0}  # -1 until it runs
        if len(pids) >= 2:  # TorchServe restarted a worker that died while loading: it will not get better
            raise RolloutError(f"{name} {version}: its worker died while loading and was restarted (see logs/model_log.log); a broken archive?")
        time.sleep(0.5)
    raise RolloutError(f"{name} {version}: no worker READY after {timeout:.0f} s")


def smoke(inference_url: str, key_file: Path | None, new: Archive, image: bytes, timeout: float) -> dict:
    """Step 4: one real request to the new version; its answer must fit the archive's metadata."""
    headers = {"Content-Type": "application/octet-stream"}
    if key_file is not None and key_file.is_file():
        headers["Authorization"] = f"Bearer {json.loads(key_file.read_text())['inference']['key']}"
    url = f"{inference_url.rstrip('/')}/predictions/{new.name}/{new.version}"
    try:
        r = requests.post(url, data=image, headers=headers, timeout=timeout)
    except requests.RequestException as e:
        raise RolloutError(f"smoke request to {url} failed: {type(e).__name__}") from None
    if r.status_code != 200:
        raise RolloutError(f"smoke request to {url} answered {r.status_code}: {r.text.strip()[:300]}")
    try:
        body = r.json()
    except ValueError:
        raise RolloutError(f"smoke request to {url} did not answer JSON: {r.text[:200]!r}") from None
    meta, names = new.metadata, new.metadata.get("names", [])
    problems = []
    if body.get("task") != meta.get("task"):
        problems.append(f"task {body.get('task')!r}, the archive says {meta.get('task')!r}")
    if body.get("model_version") != new.version:
        problems.append(f"model_version {body.get('model_version')!r}, expected {new.version!r}")
    results = body.get("detections", body.get("top"))
    if not isinstance(results, list):
        problems.append("no results in the answer")
    else:
        wrong = [(i.get("class_id"), i.get("class_name")) for i in results
                 if not (isinstance(i.get("class_id"), int) and 0 <= i["class_id"] < len(names) and names[i["class_id"]] == i.get("class_name"))]
        if wrong:
            problems.append(f"class(es) {wrong[:3]} are not the archive's")
    if problems:
        raise RolloutError(f"smoke answer of {new.name} {new.version} does not fit its archive: {'; '.join(problems)}")
    return body


def rollout(
    mgmt: Management,
    inference_url: str,
    mar: Path,
    image: bytes,
    key_file: Path | None,
    workers: int = 1,
    timeout: float = 300.0,
    keep_previous: bool = False,
    drain_timeout: float = 300.0,
    allow_task_change: bool = False,
    log=print,
) -> Rollout:
    """Steps 1-6 (module docstring). Raises :class:`NotDrained` (after the new version became the default) when
    the previous version still had requests after ``drain_timeout`` seconds."""
    new = Archive.read(mar)
    versions = [str(v["modelVersion"]) for v in mgmt.versions(new.name)]
    previous = mgmt.default_version(new.name) if versions else None
    serving_task = _served_task(mgmt, new.name, previous) if previous else None
    check_archive(new, serving_task, versions, allow_task_change)
    log(f"registering {new.name} {new.version} from {mar.name} beside {previous or 'nothing'}")
    r = mgmt.call("POST", "/models", params={"url": mar.name, "initial_workers": workers, "synchronous": "false"})
    if r.status_code not in (200, 202):
        raise RolloutError(f"registering {mar.name} failed ({r.status_code}): {r.text.strip()[:300]}")
    try:
        ready_s = wait_ready(mgmt, new.name, new.version, timeout)
        log(f"  a worker is READY after {ready_s:.1f} s")
        body = smoke(inference_url, key_file, new, image, timeout=120)
        log(f"  smoke request answered: {len(body.get('detections', body.get('top', [])))} result(s), version {body['model_version']}")
    except RolloutError:
        mgmt.call("DELETE", f"/models/{new.name}/{new.version}")  # never leave a broken version registered
        raise
    r = mgmt.call("PUT", f"/models/{new.name}/{new.version}/set-default")
    if r.status_code != 200:
        mgmt.call("DELETE", f"/models/{new.name}/{new.version}")
        raise RolloutError(f"set-default of {new.version} failed ({r.status_code}): {r.text.strip()[:300]}")
    log(f"  {new.name} {new.version} is the default")
    retired = retire(mgmt, new.name, previous, drain_timeout, log) if previous and not keep_previous else None
    return Rollout(new.version, previous, retired)


@dataclass(frozen=True)
class Rollout:
    """A rollout that made ``version`` the default."""

    version: str
    previous: str | None  # the default before it
    drain: "Drain | None"  # how the previous version was drained (None: kept, or there was none)


@dataclass
class Drain:
    """What :func:`drain` saw."""

    drained: bool
    seconds: float
    queued_at_start: int  # requests waiting in the version's queue when the drain began
    queued_max: int
    queued_left: int  # when the drain ended (0 when drained)


def drain(mgmt: Management, name: str, version: str, timeout: float, log=print) -> Drain:
    """Wait until ``version`` (no longer the default) has answered everything it was given: its queue is empty,
    and each of its workers has answered a describe request sent while the queue was empty (a worker takes that
    request only after answering the batch it held; :data:`DRAIN_BARRIERS` of them at least, for a request routed
    to the version just before set-default and queued a moment later). At most ``timeout`` seconds."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    state = mgmt.queue(name, version)
    if state is None:
        return Drain(True, 0.0, 0, 0, 0)
    first = queued_max = queued = state[0]
    answered: set[int | None] = set()
    barriers, last_log = 0, t0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Drain(False, time.monotonic() - t0, first, queued_max, queued)
        if queued:
            answered, barriers = set(), 0
            if time.monotonic() - last_log >= 5:
                log(f"  draining {version}: {queued} request(s) queued ({time.monotonic() - t0:.0f} s)")
                last_log = time.monotonic()
            time.sleep(min(DRAIN_POLL_S, remaining))
        else:
            try:
                pid = (_custom(mgmt.describe(name, version, timeout=remaining)) or {}).get("worker_pid")
                answered.add(pid)
                barriers += 1
            except RolloutError:  # no answer before the deadline, or no describe answer: ask again
                time.sleep(min(DRAIN_POLL_S, max(0.0, deadline - time.monotonic())))
        state = mgmt.queue(name, version)
        if state is None:  # unregistered by someone else: nothing of it is left to answer
            return Drain(True, time.monotonic() - t0, first, queued_max, 0)
        queued, workers = state
        queued_max = max(queued_max, queued)
        each_worker = workers <= answered if None not in answered else barriers >= len(workers)  # a handler without worker_pid
        if not queued and barriers >= DRAIN_BARRIERS and each_worker:
            return Drain(True, time.monotonic() - t0, first, queued_max, 0)


def retire(mgmt: Management, name: str, version: str, drain_timeout: float, log=print) -> Drain:
    """Drain ``version`` (not the default) and unregister it; raises :class:`NotDrained`, leaving it registered,
    when requests are still left after ``drain_timeout`` seconds."""
    if mgmt.default_version(name) == version:
        raise RolloutError(f"{name} {version} is the default version; make another one the default first (a rollout does)")
    d = drain(mgmt, name, version, drain_timeout, log)
    if not d.drained:
        left = f"{d.queued_left} request(s) queued" if d.queued_left else "a batch in flight (its queue was empty)"
        raise NotDrained(
            f"{name} {version} still had {left} after {d.seconds:.0f} s (--drain-timeout; {d.queued_at_start} queued when "
            f"the drain began, at most {d.queued_max}). It stays registered, not the default, so that they are answered; "
            f"unregister it later with `python -m tools.rollout --retire {version} --model {name}`", d
        )
    log(f"  drained {version} in {d.seconds:.1f} s ({d.queued_at_start} request(s) queued when it began, at most {d.queued_max})")
    r = mgmt.call("DELETE", f"/models/{name}/{version}")
    if r.status_code not in (200, 404):
        raise RolloutError(f"unregistering {name} {version} failed ({r.status_code}): {r.text.strip()[:300]}")
    log(f"  unregistered {version} ({r.status_code})")
    return d


def rollback(mgmt: Management, name: str, to: str | None = None, log=print) -> str:
    """Make the previous (or ``to``) version the default again; returns it."""
    versions = [str(v["modelVersion"]) for v in mgmt.versions(name)]
    current = mgmt.default_version(name)
    others = [v for v in versions if v != current]
    target = to or (others[0] if len(others) == 1 else None)
    if target is None:
        raise RolloutError(
            f"{name}: no previous version to roll back to (registered: {versions}); roll out with --keep-previous"
            if not others else f"{name}: several versions {others} besides the default {current}; pass --to VERSION"
        )
    if target not in others:
        raise RolloutError(f"{name} {target} is not registered beside the default {current} (registered: {versions})")
    r = mgmt.call("PUT", f"/models/{name}/{target}/set-default")
    if r.status_code != 200:
        raise RolloutError(f"set-default of {target} failed ({r.status_code}): {r.text.strip()[:300]}")
    log(f"{name} {target} is the default again (was {current})")
    return target


def default_smoke_image() -> bytes:
    """``bus.jpg`` from the installed Ultralytics assets (pass --smoke-image where Ultralytics is absent)."""
    from ultralytics.utils import ASSETS

    return (Path(ASSETS) / "bus.jpg").read_bytes()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.rollout", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--mar", type=Path, help="the new version's archive, inside the server's model store (python -m export --archive --version X)")
    p.add_argument("--server", default="http://127.0.0.1:8081", help="management API (default http://127.0.0.1:8081)")
    p.add_argument("--inference", default="http://127.0.0.1:8080", help="inference API, for the smoke request (default http://127.0.0.1:8080)")
    p.add_argument("--key-file", type=Path, default=Path("key_file.json"), help="TorchServe's key_file.json (default ./key_file.json)")
    p.add_argument("--smoke-image", type=Path, help="image for the smoke request (default Ultralytics' bus.jpg)")
    p.add_argument("--workers", type=int, default=1, help="workers of the new version (default 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the new version to become READY (default 300)")
    p.add_argument("--drain-timeout", type=float, default=300.0, help="at most this many seconds to drain the previous version "
                   "before it is unregistered; past it, it stays registered and the exit status is 3 (default 300)")
    p.add_argument("--keep-previous", action="store_true", help="keep the previous version registered, for --rollback")
    p.add_argument("--allow-task-change", action="store_true", help="roll out a model of another task (clients get another schema)")
    p.add_argument("--rollback", action="store_true", help="make the previous version the default again")
    p.add_argument("--retire", metavar="VERSION", help="drain VERSION (not the default) and unregister it")
    p.add_argument("--model", default="yolo", help="with --rollback or --retire: the model name (default yolo)")
    p.add_argument("--to", help="with --rollback: the version to make the default")
    args = p.parse_args(argv)
    mgmt = Management(args.server, args.key_file)
    try:
        if args.rollback:
            rollback(mgmt, args.model, args.to)
            return 0
        if args.retire:
            retire(mgmt, args.model, args.retire, args.drain_timeout)
            return 0
        if args.mar is None:
            p.error("--mar is required (or --rollback, or --retire)")
        image = args.smoke_image.read_bytes() if args.smoke_image else default_smoke_image()
        rollout(mgmt, args.inference, args.mar, image, args.key_file, args.workers, args.timeout, args.keep_previous,
                args.drain_timeout, args.allow_task_change)
    except RolloutError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except NotDrained as e:
        print(f"not drained: {e}", file=sys.stderr)
        return EXIT_NOT_DRAINED
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
