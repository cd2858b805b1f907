"""The OpenVINO runtime: the backbone's IR (``backbone.xml`` + ``backbone.bin``, written by the export) compiled for the
CPU when the worker loads, called like the traced ``backbone.pt``: ``float32[B, 3, H, W]`` -> tuple of raw head outputs.

Why an IR written at export rather than a conversion of ``backbone.pt`` at load (docs/cpu-speed.md, measured with
yolo11n-pose at 1 thread): reading + compiling the IR takes 0.2 s and 74 MB of RSS, converting the TorchScript module
2.0 s and 106 MB; the first call at a new shape costs the same either way (about 2x a steady call).

Precision is always explicit (``INFERENCE_PRECISION_HINT``): OpenVINO's own default is ``bf16`` on a CPU with
AVX-512 BF16 or AMX, which moves boxes and scores (IoU 0.90, |dscore| 0.03 against ``YOLO.predict``); ``fp32`` asks
for ``f32`` and is equal to Ultralytics. ``bf16`` comes only from ``python -m export --quantize bf16``; an INT8 IR
(NNCF) runs its quantised layers in int8 and the rest in ``f32``.

Threads: ``INFERENCE_NUM_THREADS`` is the worker's torch thread count (``handler.torch_threads``, or auto from the
CPU affinity and cgroup quota: ``handler/runtime/device.py``), one stream, and no pinning of OpenVINO's threads to
cores (two workers of one thread each would otherwise both pin to the first core of the affinity).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from handler.contract import OPENVINO_RUNTIME

INSTALL_HINT = "pip install 'yolo-torchserve[openvino]'"
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: NNCF's int8 layers; the others f32
METADATA_RT_INFO = "yolo_torchserve_metadata"  # the export metadata inside the IR (rt_info), checked at load


def import_openvino():
    """``import openvino``; raises ``ImportError`` with the one line that says what to install."""
    try:
        import openvino
    except ImportError:
        raise ImportError(f"the openvino runtime needs the openvino package: {INSTALL_HINT}") from None
    return openvino


def compile_config(precision: str, threads: int) -> dict:
    """The CPU plugin's settings: precision, threads, latency, one stream, threads not pinned to cores."""
    return {
        "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
        "INFERENCE_NUM_THREADS": int(threads),
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "ENABLE_CPU_PINNING": False,
    }


class OpenVinoBackbone:
    """A compiled ``backbone.xml``, callable like the TorchScript backbone (one infer request: one call at a time,
    as a worker calls it)."""

    runtime = OPENVINO_RUNTIME
    channels_last = False  # reads dense NCHW: YoloPipeline.to_input makes it so (pipeline.planar_input)

    def __init__(self, compiled, precision: str, threads: int) -> None:
        self._compiled = compiled  # openvino.CompiledModel
        self._request = compiled.create_infer_request()
        self._outputs = len(compiled.outputs)
        self.precision = precision
        self.threads = threads
        self.device = torch.device("cpu")

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        """``images: float32[B, 3, H, W]`` (any layout; OpenVINO reads dense NCHW) -> the raw head outputs, copied
        out of the request (the next call reuses its buffers)."""
        x = images.detach().to("cpu", torch.float32).contiguous()  # a copy only for a channels-last batch
        self._request.infer({0: x.numpy()}, share_inputs=True)
        return tuple(torch.from_numpy(self._request.get_output_tensor(i).data.copy()) for i in range(self._outputs))

    def eval(self) -> "OpenVinoBackbone":
        return self

    def half(self) -> "OpenVinoBackbone":
        raise ValueError("half=True is a CUDA setting; the openvino runtime runs on CPU: set half: false")


def load_openvino_backbone(xml: Path, precision: str, threads: int) -> tuple[OpenVinoBackbone, dict | None]:
    """Read and compile ``xml`` for the CPU; returns the backbone and the export metadata embedded in the IR (None
    when it has none). Raises ``ImportError`` (not installed) or ``ValueError`` (an unknown precision)."""
    if precision not in PRECISION_HINTS:
        raise ValueError(f"{xml}: precision {precision!r} is not one of {list(PRECISION_HINTS)}")
    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(str(xml))
    meta = json.loads(model.get_rt_info([METADATA_RT_INFO]).astype(str)) if model.has_rt_info([METADATA_RT_INFO]) else None
    compiled = core.compile_model(model, "CPU", compile_config(precision, threads))
    return OpenVinoBackbone(compiled, precision, threads), meta
