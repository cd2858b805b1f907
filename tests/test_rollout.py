"""Versioned rollout and rollback: the archive checks without a server, then a real
TorchServe under load through a good rollout, a broken archive and a rollback, with zero failed requests."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest

from handler.contract import CONTRACT_VERSION, archive_file_name
from tools import rollout as rollout_tool
from tools.rollout import Archive, NotDrained, RolloutError, check_archive, drain, retire


def _archive(task="pose", contract=CONTRACT_VERSION, version="2.0") -> Archive:
    return Archive(Path(f"yolo-{version}.mar"), "yolo", version, {"contract": contract, "task": task, "names": ["person"]})


def test_archive_checks_refuse_what_would_break_clients():
    check_archive(_archive(), "pose", ["1.0"], allow_task_change=False)  # a good one passes
    with pytest.raises(RolloutError, match=f"contract version 1, this handler reads {CONTRACT_VERSION}"):
        check_archive(_archive(contract=1), "pose", ["1.0"], False)
    with pytest.raises(RolloutError, match="is a detect model, the serving version is pose.*--allow-task-change"):
        check_archive(_archive(task="detect"), "pose", ["1.0"], False)
    check_archive(_archive(task="detect"), "pose", ["1.0"], allow_task_change=True)
    with pytest.raises(RolloutError, match="version 2.0 of 'yolo' is already registered"):
        check_archive(_archive(), "pose", ["1.0", "2.0"], False)


def test_archive_is_read_from_the_mar_without_loading_it(tmp_path):
    mar = tmp_path / "yolo-2.0.mar"
    with zipfile.ZipFile(mar, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "yolo", "modelVersion": "2.0"}}))
        z.writestr("metadata.json", json.dumps({"contract": CONTRACT_VERSION, "task": "pose"}))
    a = Archive.read(mar)
    assert (a.name, a.version, a.metadata["task"]) == ("yolo", "2.0", "pose")
    (tmp_path / "junk.mar").write_bytes(b"not a zip")
    with pytest.raises(RolloutError, match="not a model archive"):
        Archive.read(tmp_path / "junk.mar")
    with pytest.raises(RolloutError, match="not found"):
        Archive.read(tmp_path / "missing.mar")


class FakeManagement:
    """The management API of a version being drained, as a script: each ``GET /models/yolo/1.0`` pops the next
    queue depth (the last one stays), each describe request the next worker that answers it (``None``: a handler
    that does not name its worker; ``"timeout"``: no answer). ``events`` records the calls in order."""

    def __init__(self, queued: list[int], answers: list, workers: set[int] = frozenset({11}), default: str = "2.0") -> None:
        self.queued, self.answers, self.workers, self.default = list(queued), list(answers), set(workers), default
        self.events: list[str] = []

    def queue(self, name, version):
        depth = self.queued.pop(0) if len(self.queued) > 1 else self.queued[0]
        self.events.append(f"queue {depth}")
        return depth, self.workers

    def describe(self, name, version, timeout=None):
        pid = self.answers.pop(0) if self.answers else "timeout"
        self.events.append(f"describe {pid}")
        if pid == "timeout":
            raise RolloutError("no answer")
        return {"customizedMetadata": {"task": "pose"} if pid is None else {"task": "pose", "worker_pid": pid}}

    def default_version(self, name):
        return self.default

    def call(self, method, path, **kwargs):
        self.events.append(f"{method} {path}")
        return type("R", (), {"status_code": 200, "text": ""})()


@pytest.fixture
def fast_polls(monkeypatch):
    monkeypatch.setattr(rollout_tool, "DRAIN_POLL_S", 0.001)


def test_drain_waits_for_the_queue_then_for_each_worker(fast_polls):
    """The queue empties (3, 2, 0); then describe requests until two have come back with an empty queue and every
    worker (11 and 12) has answered one; only then the version is unregistered."""
    mgmt = FakeManagement(queued=[3, 2, 0], answers=[11, 11, 11, 12], workers={11, 12})
    d = retire(mgmt, "yolo", "1.0", drain_timeout=30, log=lambda _: None)
    assert d.drained and (d.queued_at_start, d.queued_max) == (3, 3)
    assert mgmt.events == ["queue 3", "queue 2", "queue 0", "describe 11", "queue 0", "describe 11", "queue 0",
                           "describe 11", "queue 0", "describe 12", "queue 0", "DELETE /models/yolo/1.0"]


def test_requests_that_arrive_during_the_drain_start_it_again(fast_polls):
    mgmt = FakeManagement(queued=[0, 2, 0], answers=[11, 11, 11])
    retire(mgmt, "yolo", "1.0", drain_timeout=30, log=lambda _: None)
    assert mgmt.events == ["queue 0", "describe 11", "queue 2", "queue 0", "describe 11", "queue 0", "describe 11", "queue 0",
                           "DELETE /models/yolo/1.0"]


def test_a_handler_that_does_not_name_its_worker_needs_a_describe_per_worker(fast_polls):
    mgmt = FakeManagement(queued=[0], answers=[None, None, None], workers={11, 12, 13})
    retire(mgmt, "yolo", "1.0", drain_timeout=30, log=lambda _: None)
    assert mgmt.events.count("describe None") == 3 and mgmt.events[-1] == "DELETE /models/yolo/1.0"


@pytest.mark.parametrize("queued,answers,left", [([5], [], "5 request(s) queued"), ([0], ["timeout"], "a batch in flight")])
def test_a_drain_that_runs_out_of_time_keeps_the_version(fast_polls, queued, answers, left):
    """Nothing is unregistered while a request is queued or a batch is in flight: the version stays, and the error
    says what was left and how to finish later."""
    mgmt = FakeManagement(queued=queued, answers=answers)
    with pytest.raises(NotDrained, match=rf"yolo 1.0 still had {re.escape(left)}.* after 0 s.*stays registered.*--retire 1.0 --model yolo"):
        retire(mgmt, "yolo", "1.0", drain_timeout=0.05, log=lambda _: None)
    assert not [e for e in mgmt.events if e.startswith("DELETE")]


def test_the_default_version_is_not_retired():
    mgmt = FakeManagement(queued=[0], answers=[], default="1.0")
    with pytest.raises(RolloutError, match="1.0 is the default version"):
        retire(mgmt, "yolo", "1.0", drain_timeout=1)
    assert mgmt.events == []


def test_an_unregistered_version_is_drained():
    class Gone(FakeManagement):
        def queue(self, name, version):
            return None

    assert drain(Gone(queued=[0], answers=[]), "yolo", "1.0", timeout=1).drained


def test_version_file_names():
    assert archive_file_name("yolo", "1.0") == "yolo.mar" and archive_file_name("yolo", "2.0") == "yolo-2.0.mar"


def test_each_version_exports_into_its_own_folder():
    """1.0 and 2.0 never share an export folder, so rerunning the archiver for 1.0 packs 1.0's files."""
    from export.__main__ import parse_args

    assert parse_args(["--weights", "w.pt"]).out == Path("exports/yolo")
    assert parse_args(["--weights", "w.pt", "--version", "2.0"]).out == Path("exports/yolo-2.0")
    assert parse_args(["--weights", "w.pt", "--name", "cars", "--version", "2.0"]).out == Path("exports/cars-2.0")
    assert parse_args(["--weights", "w.pt", "--version", "2.0", "--out", "mine"]).out == Path("mine")


@pytest.mark.slow
@pytest.mark.integration
def test_rollout_under_load_loses_nothing(tmp_path, pose_weights):
    """The CI version of ``python -m bench.rollout_load``: 4 clients the whole time; roll out 2.0 (1.0 drained and
    unregistered), try an archive with a corrupt backbone.pt, roll out 1.0 again keeping 2.0, roll back to 2.0,
    retire 1.0. Every request gets 200; answers switch between the versions; the broken archive never answers."""
    from bench.rollout_load import run

    report = run(tmp_path, str(pose_weights), concurrency=4, broken=["corrupt"], before_s=6, between_s=4, after_s=6, log=print)
    assert [s["what"] for s in report.steps] == ["rollout 2.0 (drains 1.0)", "rollout broken archive: corrupt",
                                                 "rollout 1.0 again (keep 2.0)", "rollback to 2.0", "retire 1.0"], report.steps
    assert all(s["ok"] for s in report.steps), report.steps
    assert "yolo 3.0 cannot serve: yolo 3.0 could not load: ArtifactError: " in report.steps[1]["message"], report.steps[1]
    assert "backbone.pt cannot be loaded as TorchScript" in report.steps[1]["message"], report.steps[1]  # in seconds, not at the timeout
    assert report.steps[1]["end"] - report.steps[1]["start"] < 60, report.steps[1]
    assert [s["drain"]["version"] for s in report.steps if s["drain"]] == ["1.0", "1.0"], report.steps
    assert report.sent >= 100, report.sent
    assert report.failed == 0, report.statuses
    versions_seen = [v for row in report.version_share for v in row if v not in ("t0", "t1", "n")]
    assert set(versions_seen) == {"1.0", "2.0"}, report.version_share  # the corrupt 3.0 never answered
    first, last = report.version_share[0], [r for r in report.version_share if r["n"]][-1]
    assert first.get("1.0") == 1.0 and last.get("2.0") == 1.0, (first, last)
    assert set(report.longest_queue) >= {"1.0", "2.0"}, report.longest_queue


# ---------------------------------------------------------------- draining, on a real TorchServe

DRAIN_CLIENTS = 8
FIXED_DRAIN_S = 5.0  # what the rollout once slept between set-default and unregistering the previous version


@pytest.fixture(scope="module")
def slow_versions(tmp_path_factory):
    """A TorchServe with the model API on for rollouts (``rollout_overrides``) serving yolo 1.0, whose handler spends
    ``DELAY_S`` on every batch of one request (``tests/wrapped_handlers/slow_yolo_handler.py``): 8 clients queue
    requests faster than it answers them. ``yolo-2.0.mar`` beside it has the plain handler. A small detect model
    (yolov8n.yaml at 320), so that the delay, not the forward, sets the pace."""
    import shutil
    import warnings

    from export.archive import build_archive
    from export.exporter import export_model
    from serving_support import wrapped_archive
    from tools.server import rollout_overrides, start_server

    root = tmp_path_factory.mktemp("slow_rollout")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit in torch 2.14
        v1 = export_model("yolov8n.yaml", root / "v1", [320, 320], check=False, log=lambda _: None, version="1.0").out_dir
    store = root / "store"
    settings = {"warmup": 0, "torch_threads": 1}
    wrapped_archive(v1, store, "slow_yolo_handler.py", "1.0", settings, batch_size=1)
    v2 = shutil.copytree(v1, root / "v2", ignore=shutil.ignore_patterns("code"))
    meta = json.loads((v2 / "metadata.json").read_text())
    (v2 / "metadata.json").write_text(json.dumps({**meta, "model_version": "2.0"}))
    build_archive(v2, "yolo", store, handler_settings=settings)
    server = start_server(store, root / "server", overrides=rollout_overrides(store))
    try:
        yield server, store
    finally:
        server.stop()


def _wait_for_queue(mgmt, version: str, depth: int, timeout: float = 120.0) -> int:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued, _ = mgmt.queue("yolo", version)
        if queued >= depth:
            return queued
        time.sleep(0.2)
    raise AssertionError(f"yolo {version}: its queue never reached {depth}")


@pytest.mark.slow
@pytest.mark.integration
def test_a_rollout_drains_what_is_queued_on_the_old_version(slow_versions, sample_images):
    """1.0 answers one request per second and 8 clients keep it busy: when 2.0 becomes the default, more requests are
    queued on 1.0 than it can answer in the fixed 5 s the rollout once slept. A drain that waits for the queue
    answers all of them (200), and only then unregisters 1.0; then a drain that runs out of time keeps the old
    version registered, so nothing is lost either, and ``--retire`` finishes the job."""
    import time

    from bench.rollout_load import Load
    from wrapped_handlers.slow_yolo_handler import DELAY_S
    from tools.rollout import Management, default_smoke_image, rollout

    server, store = slow_versions
    mgmt = Management(server.management_url, server.key_file)
    image = default_smoke_image()
    with Load(server, image, DRAIN_CLIENTS) as load:
        _wait_for_queue(mgmt, "1.0", DRAIN_CLIENTS - 2)
        done = rollout(mgmt, server.inference_url, store / "yolo-2.0.mar", image, server.key_file, log=print)
        assert done.version == "2.0" and done.previous == "1.0" and done.drain.drained, done
        assert done.drain.queued_at_start * DELAY_S > FIXED_DRAIN_S, done.drain  # a fixed 5 s drain would have lost some
        assert done.drain.seconds > FIXED_DRAIN_S, done.drain
        assert mgmt.queue("yolo", "1.0") is None  # unregistered
        time.sleep(2)
    answers = load.answers
    assert {a.status for a in answers} == {200}, sorted({a.status for a in answers})  # 0: never answered
    assert {a.version for a in answers} == {"1.0", "2.0"} and len(answers) >= DRAIN_CLIENTS * 2, len(answers)

    # The other way round (2.0 drains at once), then a drain shorter than 1.0's queue: 1.0 stays, nothing is lost.
    from tools.rollout import NotDrained, retire

    with Load(server, image, DRAIN_CLIENTS) as load:
        back = rollout(mgmt, server.inference_url, store / "yolo.mar", image, server.key_file, log=print)
        assert back.version == "1.0" and back.drain.drained and mgmt.queue("yolo", "2.0") is None, back
        _wait_for_queue(mgmt, "1.0", DRAIN_CLIENTS - 2)
        with pytest.raises(NotDrained, match="yolo 1.0 still had .* stays registered") as e:
            rollout(mgmt, server.inference_url, store / "yolo-2.0.mar", image, server.key_file, drain_timeout=1.0, log=print)
        assert e.value.drain.queued_left > 0, e.value.drain
        assert mgmt.default_version("yolo") == "2.0" and mgmt.queue("yolo", "1.0") is not None
        retired = retire(mgmt, "yolo", "1.0", drain_timeout=120, log=print)
        assert retired.drained and mgmt.queue("yolo", "1.0") is None, retired
        time.sleep(2)
    assert {a.status for a in load.answers} == {200}, sorted({a.status for a in load.answers})


@pytest.mark.slow
@pytest.mark.integration
def test_torchserve_does_not_answer_what_is_queued_when_a_model_is_unregistered(slow_versions, sample_images):
    """What the drain avoids, as TorchServe 0.12 does it (docs/torchserve.md): requests queued on a model version that is
    unregistered are never answered, and the batch its worker holds gets a 500."""
    import threading
    import time

    import requests

    server, store = slow_versions
    name = "doomed"  # yolo.mar once more, under a name of its own
    headers = server.headers("management")
    r = requests.post(f"{server.management_url}/models", params={"url": "yolo.mar", "model_name": name, "initial_workers": 1,
                                                                 "synchronous": "true"}, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    results: list = []
    body = sample_images[0].read_bytes()

    def client() -> None:
        try:
            answer = requests.post(f"{server.inference_url}/predictions/{name}", data=body,
                                   headers={**server.headers(), "Content-Type": "image/jpeg"}, timeout=20)
            results.append((answer.status_code, answer.text[:200]))
        except requests.RequestException as e:
            results.append((0, type(e).__name__))

    threads = [threading.Thread(target=client) for _ in range(5)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while requests.get(f"{server.management_url}/models/{name}", headers=headers, timeout=10).json()[0]["jobQueueStatus"]["pendingRequests"] < 3:
        assert time.monotonic() < deadline, "the requests never queued"
        time.sleep(0.1)
    r = requests.delete(f"{server.management_url}/models/{name}", headers=headers, timeout=60)
    for t in threads:
        t.join(timeout=60)
    print(f"unregister: {r.status_code} {r.text.strip()[:200]}; the 5 requests: {results}")
    assert r.status_code == 200, r.text
    assert sorted(s for s, _ in results).count(0) >= 3, results  # the queued ones: no answer within 20 s
