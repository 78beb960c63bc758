"""Device figures brought to the host without waiting for the device: what the serving path's flushes read.

:meth:`Snapshot.start`, at a forward boundary, copies the given device tensors on the device, in the
order of the running stream (the forward's): an accumulator is *drained* (what was copied is subtracted
from it, so a write that lands after the copy stays there for the next snapshot), a ring buffer is only
copied. It then hands the copies to its device's copier, which brings them to host memory
asynchronously. :meth:`Snapshot.ready` asks whether they have arrived (a query: it never waits);
:meth:`Snapshot.take` hands them over, once. While a snapshot is in flight no other starts (``start``
refuses), so nothing in flight is ever overwritten, and whatever later forwards add simply stays in the
device accumulators until the next snapshot. :meth:`Snapshot.wait` blocks until the copies are there:
only for callers that run while no forward does (the scheduler idle, an admin change, a test).

Copiers: :class:`StreamCopier` on CUDA (a side stream waits on an event recorded on the forward's stream
after the device copies, copies into pinned host buffers with ``non_blocking=True`` and records a
completion event, which :meth:`Snapshot.ready` queries); :func:`host_copier` elsewhere (the CPU test
bed: the device copies are host tensors already, complete when made). A test hands :class:`Snapshot`
copiers of its own (a fake stream/event pair, a copier that completes when told).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from xshare.sglang.observe.tally import capturing

__all__ = ["Copier", "Snapshot", "StreamCopier", "Transfer", "default_copier", "host_copier"]


class Transfer(Protocol):
    """Host copies on their way: ``host`` (one tensor per device copy, in order) is valid once ``done()``."""

    host: list[Tensor]

    def done(self) -> bool: ...  # arrived (a query, never a wait)

    def wait(self) -> None: ...  # block until arrived


Copier = Callable[[list[Tensor]], Transfer]


class Arrived:
    """A transfer complete when made (copies already on the host)."""

    def __init__(self, host: list[Tensor]) -> None:
        self.host = host

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


def host_copier(copies: list[Tensor]) -> Transfer:
    """Off CUDA: the device copies of a CPU tensor are host tensors already (made in stream order, i.e. now)."""
    return Arrived(copies)


class _OnStream:
    """Copies in flight on a side stream; ``keep`` holds the device copies until they have been read."""

    def __init__(self, host: list[Tensor], keep: list[Tensor], event: Any) -> None:
        self.host, self._keep, self._event = host, keep, event

    def done(self) -> bool:
        return bool(self._event.query())

    def wait(self) -> None:
        self._event.synchronize()


class StreamCopier:
    """CUDA: device copies to pinned host memory on a side stream of ``device``. ``cuda``: the module that
    supplies ``Stream``, ``Event``, ``current_stream`` and ``stream`` (``torch.cuda``; a test passes fakes),
    ``pin``: pinned host buffers (needs CUDA)."""

    def __init__(self, device: torch.device, cuda: Any = torch.cuda, pin: bool = True) -> None:
        self.device, self.cuda, self.pin = device, cuda, pin
        self.stream = cuda.Stream(device)

    def __call__(self, copies: list[Tensor]) -> Transfer:
        after = self.cuda.Event()
        after.record(self.cuda.current_stream(self.device))  # the forward's stream, after the device copies
        self.stream.wait_event(after)
        with self.cuda.stream(self.stream):
            host = [torch.empty(c.shape, dtype=c.dtype, pin_memory=self.pin) for c in copies]
            for h, c in zip(host, copies, strict=True):
                h.copy_(c, non_blocking=True)
            done = self.cuda.Event()
            done.record(self.stream)
        return _OnStream(host, copies, done)


def default_copier(device: torch.device) -> Copier:
    """The copier of ``device``: :class:`StreamCopier` on CUDA, :func:`host_copier` elsewhere."""
    return StreamCopier(device) if device.type == "cuda" else host_copier


class Snapshot:
    """One snapshot at a time of a list of device tensors (see the module docstring). ``copier_for``:
    device -> its copier (made once per device)."""

    def __init__(self, copier_for: Callable[[torch.device], Copier] = default_copier) -> None:
        self._copier_for = copier_for
        self._copiers: dict[str, Copier] = {}
        self._flight: list[tuple[list[int], Transfer]] | None = None  # per device: positions, transfer
        self._size = 0

    @property
    def busy(self) -> bool:
        """A snapshot was started and not taken yet."""
        return self._flight is not None

    def start(self, sources: Sequence[Tensor], drain: Sequence[bool]) -> bool:
        """Snapshot ``sources`` now, in the current stream's order (``drain[i]``: subtract the copy from
        ``sources[i]``). False, and nothing done, while one is in flight, with no source, or while a
        source's stream captures a CUDA graph (a copy recorded into a graph would replay forever)."""
        if self.busy or not sources or any(capturing(t.device) for t in sources):
            return False
        by_device: dict[str, list[int]] = {}
        for i, t in enumerate(sources):
            by_device.setdefault(str(t.device), []).append(i)
        flight = []
        for key, positions in by_device.items():
            copies = [sources[i].clone() for i in positions]
            copier = self._copiers.get(key)
            if copier is None:
                copier = self._copiers[key] = self._copier_for(sources[positions[0]].device)
            flight.append((positions, copier(copies)))
            for i, copy in zip(positions, copies, strict=True):  # drained once the copy is on its way (a
                if drain[i]:  # copier that fails drains nothing); later writes land after, in stream order
                    sources[i].sub_(copy)
        self._flight, self._size = flight, len(sources)
        return True

    def ready(self) -> bool:
        """Whether the snapshot in flight has reached the host (never waits; False when none is)."""
        return self._flight is not None and all(t.done() for _, t in self._flight)

    def wait(self) -> None:
        """Block until the snapshot in flight has reached the host (only where no forward runs)."""
        for _, transfer in self._flight or ():
            transfer.wait()

    def take(self) -> list[Tensor]:
        """The host copies of the snapshot, in the order of ``start``'s sources; the next may start then."""
        if not self.ready():
            raise RuntimeError("snapshot: nothing has arrived to take")
        out: list[Tensor | None] = [None] * self._size
        for positions, transfer in self._flight or ():
            for i, host in zip(positions, transfer.host, strict=True):
                out[i] = host
        self._flight = None
        return [t for t in out if t is not None]
