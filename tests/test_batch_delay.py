"""The batch delay the archive ships: per device, from the measured curve, and a user's value wins."""

from __future__ import annotations

import shutil

import yaml

from export.archive import BATCH_DELAY_MS, build_archive, model_config_yaml


def test_the_default_delay_follows_the_device():
    cpu, gpu = (yaml.safe_load(model_config_yaml(device=d))["maxBatchDelay"] for d in ("cpu", "gpu"))
    assert (cpu, gpu) == (BATCH_DELAY_MS["cpu"], BATCH_DELAY_MS["gpu"])
    assert 0 < cpu < gpu  # 0 makes TorchServe poll its queue; a GPU batch is worth a longer wait
    assert yaml.safe_load(model_config_yaml(max_batch_delay_ms=7))["maxBatchDelay"] == 7


def test_a_users_value_in_model_config_wins(pose_export, tmp_path):
    export_dir = tmp_path / "export"
    shutil.copytree(pose_export.out_dir, export_dir, ignore=shutil.ignore_patterns("code"))
    (export_dir / "model-config.yaml").write_text("maxBatchDelay: 9\nbatchSize: 8\nhandler:\n  conf: 0.4\n")
    build_archive(export_dir, "yolo", tmp_path / "store", keep_user_config=True, device="gpu")
    written = yaml.safe_load((export_dir / "model-config.yaml").read_text())
    assert (written["maxBatchDelay"], written["batchSize"], written["handler"]["conf"]) == (9, 8, 0.4)
    build_archive(export_dir, "yolo", tmp_path / "store", device="gpu")  # not keeping: the device default
    assert yaml.safe_load((export_dir / "model-config.yaml").read_text())["maxBatchDelay"] == BATCH_DELAY_MS["gpu"]


def test_the_report_renders_both_passes():
    from bench.batch_delay import to_markdown

    run = {"c1": {"bus.jpg": {"S_p50": 90.0, "L1_p50": 80.0, "S/L1": 1.125, "handler_ms": {"preprocess": 5, "inference": 70, "postprocess": 1}}},
           "queue_ms_per_request_c1": 2.5, "load": {"4": {"images_per_s": 12.0, "p50": 300.0}}}
    text = to_markdown({"delays": {"2": [run, run]}, "layouts": {"1w x 2t": [run]}, "layout_delay": 2}, [1, 4])
    assert "| 2 | 90.0 / 90.0 |" in text and "1.12 / 1.12" in text and "12.0 / 12.0" in text and "| 1w x 2t |" in text


def test_the_report_has_the_batch_size_1_point_and_the_layout_batch():
    from bench.batch_delay import to_markdown

    run = {"c1": {"bus.jpg": {"S_p50": 90.0, "L1_p50": 80.0, "S/L1": 1.125, "handler_ms": {"preprocess": 5, "inference": 70, "postprocess": 1}}},
           "queue_ms_per_request_c1": 2.5, "load": {"4": {"images_per_s": 12.0, "p50": 300.0}}}
    b1 = {**run, "queue_ms_per_request_c1": 0.4}
    text = to_markdown({"delays": {"2": [run]}, "batch1": [b1, b1], "layouts": {"2w x 1t": [run]}, "layout_delay": 2, "layout_batch": 4}, [1, 4])
    assert "| batchSize 1 (no wait) | 90.0 / 90.0 |" in text and "| 0.4 / 0.4 |" in text
    assert "Thread layouts at maxBatchDelay 2 ms, batchSize 4:" in text


class _Stub:
    """A server stand-in for bench.served.Client: a local HTTP server that records which URL it served."""

    def __init__(self, name: str, log: list):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                log.append(name)
                body = b'{"detections": []}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.predictions_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/predictions/yolo"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def headers(self):
        return {}


def test_the_throughput_ab_alternates_servers_chunk_by_chunk():
    from bench.batch_delay import throughput_ab

    log: list = []
    stubs = {"A": _Stub("A", log), "B": _Stub("B", log)}
    try:
        out = throughput_ab(stubs, [b"x" * 10, b"y" * 20], requests_n=6, concurrency=[2], chunks=3)
    finally:
        for s in stubs.values():
            s.httpd.shutdown()
    warm, measured = log[:4], log[4:]
    assert sorted(warm) == ["A", "A", "B", "B"]
    # chunks of 6 requests, A B / B A / A B: each server's requests run as one block, in alternating order
    blocks = [measured[i:i + 6] for i in range(0, len(measured), 6)]
    assert [set(b) for b in blocks] == [{"A"}, {"B"}, {"B"}, {"A"}, {"A"}, {"B"}]
    assert set(out) == {"2"} and set(out["2"]) == {"A", "B"}
    for figs in out["2"].values():
        assert len(figs["chunks"]) == 3 and figs["images_per_s"] > 0
        assert min(figs["chunks"]) <= figs["images_per_s"] <= max(figs["chunks"])
