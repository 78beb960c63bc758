"""Triton's interpreter for ``@triton.jit`` kernels on CPU tensors: the one place both the selector's
kernels (:mod:`xshare.selection.kernels`) and the GPU check's MoE kernels (:mod:`xshare.bench`) get
their interpreted form. Imports Triton only when called."""

from __future__ import annotations

from typing import Any

_INTERPRETED: dict[str, Any] = {}


def interpreted(*kernels: Any) -> tuple[Any, ...]:
    """Each kernel wrapped for Triton's interpreter, made once per kernel and reused; a kernel that
    already is one (its module imported under ``TRITON_INTERPRET=1``) is returned as it is."""
    from triton.runtime.interpreter import InterpretedFunction

    out = []
    for k in kernels:
        if isinstance(k, InterpretedFunction):  # imported under TRITON_INTERPRET=1
            out.append(k)
            continue
        key = f"{k.fn.__module__}.{k.fn.__qualname__}"
        if key not in _INTERPRETED:
            _INTERPRETED[key] = InterpretedFunction(k.fn)
        out.append(_INTERPRETED[key])
    return tuple(out)
