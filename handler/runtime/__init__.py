"""Where and how the exported files run: the worker's device and torch threads (``device.py``, from the CPU
budget of ``cpu_budget.py``), loading and checking the exported files (``artifacts.py``), the backbone formats
(TorchScript, AOTInductor: ``aoti.py``), and the CUDA side stream that makes the next input during a forward
(``overlap.py``)."""
