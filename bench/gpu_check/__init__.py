"""The GPU checks and figures, written as one JSON and a markdown summary (a package: ``__main__.py`` runs the
sections of ``checks.py``, ``throughput.py``, ``gpu_id.py`` and ``compiled.py`` in order; ``summary.py`` renders the markdown).

    python3 -m bench.gpu_check [--exports exports/gpu_check] [--out DIR] [--device cuda:0|cpu] [--quick]

It runs on a CUDA machine that has torch, torchvision, OpenCV and numpy but no Ultralytics, TorchServe or
Java, from the folder ``python -m bench.gpu_prepare`` wrote here (the exported pairs, their CPU reference
outputs, the test images) and this repo's ``handler/`` package, in process. ``--device cpu`` is the dry run
that ``tests/test_gpu_check.py`` makes on a CPU machine: every section runs, the CUDA-only ones say why
they were skipped. See ``docs/gpu.md`` for the command the device tool runs.

Sections, in order (the JSON is rewritten after each, so a run cut short keeps what it measured):

1. ``environment``: device, driver, torch, CUDA, cuDNN, OpenCV, date.
2. ``artifacts``: the carried files' hashes, and whether this torch loads each TorchScript file; a
   ``postprocess.pt`` it cannot load is scripted again here from ``postprocess_eager.pt`` (the same module,
   from this repo's ``export/`` source) and the run goes on with that.
3. ``tests``: ``tests/test_letterbox_torch.py`` and ``tests/test_preprocess_device.py`` (their CUDA cases and
   the slow pipeline case, on the carried export) under pytest.
4. ``letterbox``: OpenCV here and the torch letterbox on the device against the pixels OpenCV made where the
   reference was written.
5. ``fp32``: FP32 on the device against the CPU reference (same detections, IoU >= 0.999, |dscore| <= 1e-3), with
   cuDNN's TF32 on (the default) and off, and ``preprocess: device`` against ``cpu`` (bit for bit).
6. ``fp16``: FP16 against FP32 on the device and against the CPU reference (matched IoU >= 0.99, |dscore| <= 0.01).
7. ``gpu_decode``: torchvision's ``decode_jpeg`` on the device (nvJPEG) against OpenCV: pixels and detections.
8. ``throughput``: batches 1/8/32/64 in FP32 and FP16: L0 (backbone only) images/s and peak memory; L1
   (bytes -> JSON through ``YoloService``) with ``preprocess`` cpu and device, and with GPU decode; the
   3840x2160 frame at batch 8; L1/L0 at batch 32 FP16 (target >= 0.5).
9. ``gpu_id``: a worker (``YoloHandler.initialize`` with TorchServe's context, in a child process) started with
   ``gpu_id 0`` allocates only on that device; CUDA hidden: the load fails, or serves on CPU with cpu_fallback.
10. ``batch_delay``: what the per-batch L1 times say about ``maxBatchDelay``.
11. ``overlap``: one batch of four input shapes with the side-stream overlap on and off.
12. ``compiled``: CUDA graphs of the TorchScript FP16 backbone, and AOTInductor FP16 compiled there from the carried
    ``torch.export`` program, against TorchScript FP16 (``compiled.py``).
"""

from __future__ import annotations

# The files of the carried folder (bench/gpu_prepare.py writes them) and of the run's output.
EAGER_FILE = "postprocess_eager.pt"
REFERENCE_FILE = "reference.pt"
PROGRAM_FILE = "backbone_program.pt2"  # pose only: the backbone's torch.export program (compiled.py)
MANIFEST_FILE = "manifest.json"
JSON_FILE = "gpu_check.json"
MD_FILE = "gpu_check.md"


# The pass criteria (docs/gpu.md)
# FP32 on the device vs the CPU reference: the same detections, matched IoU >= FP32_MIN_IOU, |dscore| and classify
# |dp| <= FP32_TOL. Before any GPU had run, every value (pixels too) had to be within FP32_TOL; on an H200 cuDNN's FP32
# convolutions put keypoints up to 0.3 px from the CPU's, with TF32 on or off (docs/benchmarks.md, "GPU"), so pixels
# are reported, and judged through the IoU.
FP32_TOL = 1e-3
FP32_MIN_IOU = 0.999
FP16_MIN_IOU = 0.99
FP16_MAX_DSCORE = 0.01
L1_L0_TARGET = 0.5
BENCH_IMAGE = "bus.jpg"  # 810x1080 -> 640x480 input
LARGE_IMAGE = "frame_3840x2160.jpg"
