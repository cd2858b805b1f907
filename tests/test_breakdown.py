"""bench/experiments/breakdown.py: the protocol message it times is the one TorchServe's worker reads,
the no-work handler answers every request of a batch, and a short real run splits lone requests into
their parts, with TorchServe's batch wait where the configuration has one."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
from ts.protocol import otf_message_handler as otf

from bench.experiments import breakdown, null_handler


def test_predict_message_is_what_the_torchserve_worker_reads():
    bodies = [os.urandom(300_000), b"{}"]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender = threading.Thread(target=a.sendall, args=(breakdown.predict_message(bodies, "image/png"),))
    sender.start()
    cmd, batch = otf.retrieve_msg(b)
    sender.join()
    a.close(), b.close()
    assert cmd == otf.PREDICT_MSG and len(batch) == 2
    assert [bytes(r["requestId"]) for r in batch] == [b"req-0", b"req-1"]
    assert [bytes(r["parameters"][0]["value"]) for r in batch] == bodies
    assert {r["parameters"][0]["contentType"] for r in batch} == {"image/png"}
    assert [(bytes(h["name"]), bytes(h["value"])) for h in batch[0]["headers"]] == [(b"Content-Type", b"image/png")]


class _Context:
    def __init__(self):
        self.types = {}

    def set_response_content_type(self, idx, value):
        self.types[idx] = value


def test_null_handler_answers_every_request_with_its_size():
    ctx = _Context()
    out = null_handler.handle([{"body": bytearray(b"abc")}, {"data": b"12345"}, {}], ctx)
    assert [json.loads(o) for o in out] == [{"bytes": 3}, {"bytes": 5}, {"bytes": 0}]
    assert ctx.types == {0: "application/json", 1: "application/json", 2: "application/json"}
    assert null_handler.handle(None, ctx) is None


@pytest.mark.integration
def test_a_short_run_splits_lone_requests(tmp_path, capsys):
    out = tmp_path / "breakdown.json"
    assert breakdown.main(["--models", "null", "--variants", "shipped,batchSize 1", "--rounds", "3", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    figs = results["models"]["null"]
    assert set(figs["shipped"]) == {"bus.jpg", "zidane.jpg", "frame_3840x2160.jpg"}
    for name, f in figs["shipped"].items():
        # batchSize 4: a lone request waits the whole maxBatchDelay for a second one, in TorchServe's QueueTime
        assert f["queue"] >= results["delay_ms"] - 0.5, (name, f)
        assert 0 < f["job"] < f["rtt"] and f["stages"] == 0.0
        assert f["http"] > 0 and f["frontend+ipc"] > 0 and f["job"] >= f["queue"]  # medians, each part its own
    for f in figs["batchSize 1"].values():
        assert f["queue"] >= 0 and f["rtt"] > 0
    assert figs["_requests_client"]["bus.jpg"] > 0
    md = capsys.readouterr().out
    assert "| shipped | bus.jpg |" in md and "| batchSize 1 | frame_3840x2160.jpg |" in md
