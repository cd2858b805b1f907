"""The OpenVINO IR of the backbone (``backbone.xml`` + ``backbone.bin``), for the ``openvino`` runtime
(``handler/runtime/openvino.py``), and its INT8 version (NNCF post-training quantisation).

Contract of the IR: the traced backbone's (``export/backbone.py``): input ``images: float32[B, 3, H, W]`` RGB 0..1
with dynamic ``B``, ``H`` and ``W`` (multiples of the max stride), output the ``nl`` raw head maps in order. It is
converted from the traced ``backbone.pt`` itself (``openvino.convert_model`` of the TorchScript module), so it is the
same graph the reference runs; the weights stay FP32 (``compress_to_fp16=False``): the precision is chosen when the
worker compiles it (``INFERENCE_PRECISION_HINT``). The export metadata is embedded in the IR's ``rt_info`` and checked
against ``postprocess.pt``'s when the worker loads it.

INT8 (``python -m export --quantize int8``, the openvino engine): NNCF's ``quantize`` with the MIXED preset (symmetric
int8 weights per channel, asymmetric activations) on the calibration images, letterboxed as served.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from handler.contract import BACKBONE_FILE, OPENVINO_IR_FILE
from handler.runtime.openvino import METADATA_RT_INFO, import_openvino


def convert(export_dir: Path, example_hw: tuple[int, int]):
    """``backbone.pt`` of ``export_dir`` -> an ``openvino.Model`` with dynamic batch, height and width."""
    ov = import_openvino()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* deprecation notices in torch 2.14
        traced = torch.jit.load(str(export_dir / BACKBONE_FILE), map_location="cpu").eval()
        example = torch.rand(1, 3, *example_hw)
        return ov.convert_model(traced, example_input=example, input=[ov.PartialShape([-1, 3, -1, -1])])


def save(model, export_dir: Path, metadata_json: str) -> Path:
    """Write ``model`` as ``backbone.xml`` + ``backbone.bin`` (FP32 weights) with ``metadata_json`` in its rt_info."""
    ov = import_openvino()
    model.set_rt_info(metadata_json, [METADATA_RT_INFO])
    xml = export_dir / OPENVINO_IR_FILE
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


def quantize_int8(model, inputs: list[np.ndarray]):
    """NNCF post-training quantisation of ``model`` calibrated on ``inputs`` (``float32[1, 3, H, W]`` each, the
    served letterbox of each calibration image). Needs ``nncf`` (the ``int8`` extra)."""
    try:
        import nncf
    except ImportError:
        raise ImportError("--quantize int8 with the openvino engine needs nncf: pip install 'yolo-torchserve[int8]'") from None
    return nncf.quantize(model, nncf.Dataset(inputs), preset=nncf.QuantizationPreset.MIXED, subset_size=len(inputs))
