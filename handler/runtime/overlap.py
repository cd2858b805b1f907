"""Making the next forward's input while the current forward runs: the order of one
``YoloPipeline.infer`` call's work, and the CUDA side stream that carries the input work.

An ``infer`` call runs one backbone forward per group of equal-shape inputs. Per group ``k`` there are three
steps: *stage* (make the network input: upload, letterbox, convert), *forward* (launch the backbone) and
*finish* (wait for the forward, run the postprocessor, copy results to the CPU).

* In order (:func:`run_groups` with ``ahead=False``, the CPU): stage 0, forward 0, finish 0, stage 1, ...
* Ahead (``ahead=True``, CUDA): stage ``k + 1`` is issued right after forward ``k`` is launched and before
  finish ``k`` waits for its results, so the CPU work and the uploads of the next input run while the GPU
  runs the forward: stage 0, forward 0, stage 1, finish 0, forward 1, stage 2, finish 1, ...

On CUDA, :class:`SideStream` runs each stage on a second stream of the device and records an event after
it; :meth:`SideStream.take` makes the current (main) stream wait for that event on the GPU, not the CPU,
and tells the caching allocator that the main stream uses the tensor's memory (``record_stream``), so the
side stream cannot reuse that memory before the forward that reads it has run. Inputs are only ever
written on the side stream and read on the main stream after their event: correct by construction, with
no CPU synchronisation between the two. Inputs that already live on the device (an image decoded there) are
read by the side stream only after an event recorded on the main stream when the ``infer`` call began
(:meth:`SideStream.begin`), which precedes every forward of that call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import Tensor

S = TypeVar("S")  # a staged input
F = TypeVar("F")  # a launched forward's outputs


def run_groups(
    n: int,
    stage: Callable[[int], S],
    forward: Callable[[int, S], F],
    finish: Callable[[int, F], None],
    ahead: bool,
) -> None:
    """Run ``n`` groups in the order of the module docstring: ``forward(k, stage(k))`` then ``finish(k, ...)``
    for each ``k``; with ``ahead``, ``stage(k + 1)`` between ``forward(k)`` and ``finish(k)``."""
    staged = stage(0) if ahead and n > 0 else None
    for k in range(n):
        x = staged if ahead else stage(k)
        out = forward(k, x)  # type: ignore[arg-type]  # staged is set for every k when ahead
        if ahead and k + 1 < n:
            staged = stage(k + 1)
        finish(k, out)


@dataclass
class Staged:
    """An input made by :meth:`SideStream.stage`: the tensor and the event recorded after its last write
    (None on CPU: ready)."""

    value: Tensor
    ready: torch.cuda.Event | None = None


class SideStream:
    """Where network inputs are made: on CUDA a second stream of ``device``; on CPU, inline."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._inputs_ready: torch.cuda.Event | None = None  # see begin()

    @property
    def active(self) -> bool:
        """Whether inputs are made beside the forward (CUDA) rather than before it."""
        return self.stream is not None

    def begin(self) -> None:
        """Mark the start of one ``infer`` call: the stages that follow wait (on the GPU) for the work queued on
        the current stream so far, such as an image decoded on the device, but not for the forwards that
        this call queues after it."""
        if self.stream is not None:
            self._inputs_ready = torch.cuda.Event()
            self._inputs_ready.record(torch.cuda.current_stream(self.device))

    def stage(self, make: Callable[[], Tensor]) -> Staged:
        """Run ``make`` (which returns the input tensor) on the side stream; returns it with its ready event."""
        if self.stream is None:
            return Staged(make())
        if self._inputs_ready is None:
            raise RuntimeError("SideStream.begin() must be called before the first stage")
        self.stream.wait_event(self._inputs_ready)
        with torch.cuda.stream(self.stream):
            value = make()
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return Staged(value, ready)

    def take(self, staged: Staged) -> Tensor:
        """The staged tensor, safe to use on the current stream: that stream waits for the ready event (on the
        GPU), and the allocator keeps the tensor's memory until that stream's work queued so far is done."""
        if staged.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(staged.ready)
            staged.value.record_stream(current)
        return staged.value
