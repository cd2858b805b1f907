"""A TorchServe handler that does no work: the control of ``python -m bench.experiments.breakdown``.

It answers every request of a batch with a few bytes of JSON (the body's length), so a request
served through it costs TorchServe's own path alone: Netty's HTTP decode, the batch aggregator, the
frontend -> worker protocol over the Unix socket, the Python worker's framing and the response
write. Whatever the real handler's request costs beyond this, and beyond its in-process time, is
ours. Packed by ``bench.experiments.breakdown`` with the same ``model-config.yaml`` batching keys as the model.
"""

from __future__ import annotations

import json


def handle(data, context):
    """One ``{"bytes": N}`` per request; ``None`` (TorchServe's load-time call) gets nothing."""
    if data is None:
        return None
    out = []
    for idx, row in enumerate(data):
        body = row.get("data") or row.get("body") or b""
        context.set_response_content_type(idx, "application/json")
        out.append(json.dumps({"bytes": len(body)}))
    return out
