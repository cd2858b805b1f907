"""Development and operator tools: the TorchServe launcher, the demo, the client, rollout, deploy helpers.

Not part of the served archive: the worker needs only ``handler/``."""
