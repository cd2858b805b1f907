"""Where and how the exported files run: the worker's device and torch threads (``device.py``, from the CPU
budget of ``cpu_budget.py``), loading and checking the exported files (``artifacts.py``), the backbone runtime the
worker chooses (``runtimes.py``: TorchScript, AOTInductor in ``aoti.py``, OpenVINO in ``openvino.py``; the CPU's
instruction sets they need in ``cpu_flags.py``), and the CUDA side stream that makes the next input during a forward
(``overlap.py``)."""
