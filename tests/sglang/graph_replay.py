"""A CPU emulation of CUDA-graph capture and replay, for tests.

A CUDA graph records the kernels one call launches and replays them on the same memory: tensors that
existed before the capture (input buffers, device knobs, accumulators) are read as they are at replay,
tensors made during the capture keep their addresses, and every Python decision taken while capturing
is frozen. :class:`Graph` does the same with torch ops on the CPU: :meth:`Graph.capture` runs a callable
under a dispatch mode that records each aten op with its arguments and outputs; :meth:`Graph.replay`
runs the recorded ops again in order and writes each result into the tensor the capture produced (in
place ops mutate their recorded arguments again), so the captured call's return value holds the
replay's answer. Python code does not run again.

Ops that read the device from the host (``.item()``, ``.tolist()``, ``nonzero``...) are refused while
capturing, as a real capture refuses them. The C fast path never runs under capture (the adapter keeps
it to eager calls), and Triton launches are not aten ops: replaying a Triton kernel is checked on a GPU
by ``xshare bench gpu`` (part 5); these tests cover the torch path and every decision around it.

    graph = Graph()
    out = graph.capture(lambda: route(runtime, args, cfg))   # the capturing call
    args["router_logits"].copy_(new_logits)                  # new inputs, written in place
    runtime.update_settings(new_settings)                    # knobs written in place
    graph.replay()                                           # out now holds the replay's answer
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ops whose answer is a host value read from the device: a capture cannot contain them
_HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
               "aten.equal.default", "aten.unique_dim.default", "aten._unique2.default",
               "aten.masked_select.default"}


class HostReadInCapture(RuntimeError):
    """The captured call read a device value on the host (a real capture fails the same way)."""


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list[tuple[Any, tuple, dict, Any]]) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if str(func) in _HOST_READS:
            raise HostReadInCapture(f"{func} reads the device on the host during capture")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class Graph:
    """One captured call (see the module docstring)."""

    def __init__(self) -> None:
        self.ops: list[tuple[Any, tuple, dict, Any]] = []
        self.captured = False

    def capture(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` once, recording its ops; its return value (tensors made during the capture) is what
        :meth:`replay` rewrites."""
        if self.captured:
            raise RuntimeError("a Graph captures once")
        with _Recorder(self.ops):
            out = fn()
        self.captured = True
        return out

    def replay(self) -> None:
        """Run the recorded ops again, in order, on the recorded tensors."""
        if not self.captured:
            raise RuntimeError("replay before capture")
        for func, args, kwargs, out in self.ops:
            res = func(*args, **kwargs)
            got, _ = tree_flatten(res)
            want, _ = tree_flatten(out)
            for new, old in zip(got, want, strict=True):
                if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and new is not old:
                    if old.data_ptr() != new.data_ptr() or old.stride() != new.stride():
                        old.copy_(new)  # the captured output's memory holds the replay's value

    @property
    def num_ops(self) -> int:
        return len(self.ops)
