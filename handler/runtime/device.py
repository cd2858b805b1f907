"""Where a worker runs: its device (the GPU TorchServe gave it, or the CPU) and its torch threads.

The thread count of ``torch_threads: 0`` (auto) is :func:`handler.runtime.cpu_budget.auto_threads`: the CPUs this
process may really use (affinity, capped by a cgroup CPU quota), divided among the model's workers. A backbone runtime
with a thread pool of its own (OpenVINO) gets that count, and torch keeps one thread (:func:`threads_beside`).
"""

from __future__ import annotations

import logging

import torch

from handler.runtime.cpu_budget import auto_threads

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")


class CudaUnavailableError(RuntimeError):
    """TorchServe gave this worker a GPU, and CUDA cannot serve on it."""


def is_cuda_error(error: BaseException) -> bool:
    """Whether ``error`` comes from CUDA (no usable CUDA, out of memory, a driver or device error): a load that
    fails on it may pass on a retry or on another device, unlike a load that fails on the files or settings."""
    return isinstance(error, (CudaUnavailableError, torch.cuda.OutOfMemoryError)) or "cuda" in str(error).lower()


def select_device(gpu_id: int | None) -> torch.device:
    """``cuda:{gpu_id}`` when TorchServe gave the worker a GPU, CPU when it gave none (a CPU host).
    Raises :class:`CudaUnavailableError` when there is a GPU id but CUDA is not usable."""
    if gpu_id is None:
        return CPU
    if not torch.cuda.is_available():
        raise CudaUnavailableError(
            f"TorchServe assigned GPU {gpu_id} to this worker, but CUDA is not available "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False: no driver, or a CPU-only torch)"
        )
    return torch.device(f"cuda:{gpu_id}")


def torchscript_executor(device: torch.device) -> None:
    """On CUDA, turn TorchScript's graph-executor optimisation off for this process (the setting is process-wide; a
    worker serves one model).

    With it on, the profiling executor specialises the graph to each input shape it meets and, on CUDA, compiles
    fusion kernels for each specialisation. Measured on an H200 (torch 2.11, yolo11n-pose FP16; docs/benchmarks.md,
    "GPU"): with it on, 9 of 20 calls cycling over four shapes already seen took 386-652 ms, and the warm forward
    took 5.5-6.2 ms at batch 1-32; with it off, 4.6-4.9 ms and no such calls. The FP32 detections against the CPU
    reference were the same figures either way. On CPU torch compiles no fusion kernels by default, so the setting
    stays on there (the CPU figures were measured with it)."""
    if device.type == "cuda" and torch._C._get_graph_executor_optimize():
        torch._C._set_graph_executor_optimize(False)
        logger.info("TorchScript graph-executor optimisation: off on CUDA (no per-shape fusion compiles)")


def workers_of(model_yaml: dict | None) -> int:
    """The model's worker count from its model-config.yaml (``maxWorkers``, else ``minWorkers``, else 1)."""
    yaml = model_yaml or {}
    return max(1, int(yaml.get("maxWorkers") or yaml.get("minWorkers") or 1))


def set_threads(configured: int, device: torch.device, model_yaml: dict | None) -> int:
    """``torch.set_num_threads``: ``configured`` when set (``torch_threads``), else on CPU the auto choice
    (logged with its reason); on CUDA torch is left alone. Returns the count in force."""
    if configured:
        torch.set_num_threads(configured)
        logger.info("torch threads: %d (handler.torch_threads)", configured)
    elif device.type == "cpu":
        choice = auto_threads(workers_of(model_yaml))
        torch.set_num_threads(choice.threads)
        logger.info("torch threads: %d (auto: %s)", choice.threads, choice.reason)
    return torch.get_num_threads()


def threads_beside(backbone_threads: int) -> None:
    """A backbone runtime with its own thread pool (OpenVINO) took the worker's ``backbone_threads``: torch, which then
    runs only the input conversion and the postprocessor (well under 1 ms of work per image), gets one thread. With
    more, its OpenMP threads spin after each call and take the cores from the next forward: measured at 2 threads on
    2 cores (docs/cpu-speed.md), 2.6-3.2 ms more per image, the same answers."""
    torch.set_num_threads(1)
    logger.info("torch threads: 1 beside the backbone runtime's %d thread(s)", backbone_threads)
