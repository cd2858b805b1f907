"""Finished one-off measurements, kept runnable so that their figures can be reproduced: where a lone request's
time goes (``breakdown``, against the no-work ``null_handler``), CPU limits and worker scaling (``deploy_scale``),
TorchScript against AOTInductor (``format_benchmark``). Their run logs are in docs/measurements/."""
