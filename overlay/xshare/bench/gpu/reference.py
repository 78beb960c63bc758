"""The reference side of part 5 (:mod:`xshare.bench.gpu.served`): how an eager ``route`` call is forced onto the
selector's torch backend, which backend routed a call, the plugin's log kept while a call runs, and the comparison of
two ``route`` answers (``topk_ids`` int32 [B, width] identical, ``topk_weights`` float [B, width] within
:data:`WEIGHT_TOL`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

import torch

from xshare.bench.gpu.context import Context

WEIGHT_TOL = 1e-6  # relative (to max(1, |reference|)) tolerance on the routed weights


@contextlib.contextmanager
def torch_backend() -> Iterator[str]:
    """While inside: the adapter's ``decide`` routes on its torch backend, through whichever switch it
    has (the config's ``backend`` field, or a ``backend`` argument); without a switch, the same path.
    Yields the reference's description."""
    from xshare.sglang import layer

    original = getattr(layer, "decide", None)
    sig = inspect.signature(original) if original is not None else None
    if sig is not None and "backend" in sig.parameters:
        def forced(*args: Any, **kwargs: Any) -> Any:
            return original(*args, **{**kwargs, "backend": "torch"})

        kind = "eager route, decide(backend='torch')"
    elif sig is not None and "config" in sig.parameters and _config_has_backend():
        def forced(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.arguments["config"] = bound.arguments["config"].replace(backend="torch")
            return original(*bound.args, **bound.kwargs)

        kind = "eager route, decide with the config's backend 'torch'"
    else:
        yield "eager route (the same path, not captured)"
        return
    layer.decide = forced
    try:
        yield kind
    finally:
        layer.decide = original


def served_backend(ctx: Context) -> str | None:
    """The selector's ``backend`` setting of the served calls: the default on a GPU (what serving runs);
    in CPU mode 'triton' (interpreted), what 'auto' picks for CUDA tensors, so that CI runs the path a GPU
    serves. None where the config has no such setting (the default then)."""
    return "triton" if ctx.cpu and _config_has_backend() else None


def _config_has_backend() -> bool:
    from xshare.selection import SelectorConfig

    return any(f.name == "backend" for f in fields(SelectorConfig))


def reference_kind() -> str:
    with torch_backend() as kind:
        return kind


@contextlib.contextmanager
def caught_log() -> Iterator[list[str]]:
    """The plugin's warnings and errors while inside, kept (first line, 300 characters) instead of printed."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage().splitlines()[0][:300])

    logger = logging.getLogger("xshare.sglang")
    handler, propagate = Keep(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def compare(got: dict[str, Any] | None, ref: dict[str, Any] | None) -> list[str]:
    """Differences between two ``route`` answers (empty: ids identical, weights within WEIGHT_TOL)."""
    if ref is None:
        return ["the eager reference left the call to SGLang"]
    if got is None:
        return ["the captured call left the call to SGLang"]
    diffs = []
    if sorted(got) != sorted(ref):
        diffs.append(f"keys differ: {sorted(got)} vs {sorted(ref)}")
    for key in ("topk_ids", "topk_weights"):
        a, b = got.get(key), ref.get(key)
        if a is None or b is None:
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            diffs.append(f"{key}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}")
        elif key == "topk_ids" and not torch.equal(a, b):
            rows = (a != b).any(1).nonzero().flatten().tolist()
            diffs.append(f"topk_ids differ in rows {rows[:8]}")
        elif key == "topk_weights":
            err = ((a.float() - b.float()).abs() / b.float().abs().clamp_min(1.0)).max().item() if a.numel() else 0.0
            if not err <= WEIGHT_TOL:
                diffs.append(f"topk_weights differ by {err:.3g}")
    return diffs


def routed_backend(call: Callable[[], Any]) -> str | None:
    """The backend that routed one ``call()``, if the adapter's decision says (``Decision.backend``, with
    ``Decision.reason`` in brackets: why the torch reference routed where another backend was wanted;
    ``c`` when the C fast path routed); None when it does not say."""
    from xshare.sglang import layer

    original = getattr(layer, "decide", None)
    if original is None:
        return None
    seen: list[Any] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        decision = original(*args, **kwargs)
        seen.append(decision)
        return decision

    layer.decide = recording
    try:
        call()
    finally:
        layer.decide = original
    if not seen:
        return None
    backend = getattr(seen[-1], "backend", None)
    if backend is None and getattr(seen[-1], "cpu", None) is not None:
        backend = "c"
    reason = getattr(seen[-1], "reason", None)
    if backend is None:
        return None
    return f"{backend} ({reason})" if reason else str(backend)
