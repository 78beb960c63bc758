"""Triton's interpreter for ``@triton.jit`` kernels on CPU tensors: the one place both the selector's
kernels (:mod:`xshare.selection.backends.triton`) and the GPU check's MoE kernels (:mod:`xshare.bench`) get
their interpreted form. Imports Triton only when called.

A kernel imported without ``TRITON_INTERPRET=1`` is a ``JITFunction``, and so are the ``@triton.jit``
helpers it calls; the interpreter runs the kernel's Python body, where calling a ``JITFunction`` is an
error. :func:`interpreted` therefore runs each kernel (and each helper, recursively) with its helpers
swapped for their interpreted forms, in a copy of the module's globals (the module itself is unchanged).
"""

from __future__ import annotations

import types
from typing import Any

_INTERPRETED: dict[str, Any] = {}


def _key(fn: Any) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _interpretable(fn: types.FunctionType) -> types.FunctionType:
    """``fn``, or a copy of it whose globals map the ``@triton.jit`` helpers it names to their interpreted
    forms (Triton's own ``@jit`` functions, such as the reduce combiners the interpreter recognises, stay)."""
    from triton.runtime.jit import JITFunction

    helpers = {name: value for name in fn.__code__.co_names  # not Triton's own (reduce combiners stay as they are)
               if isinstance(value := fn.__globals__.get(name), JITFunction)
               and not value.fn.__module__.startswith("triton.")}
    if not helpers:
        return fn
    scope = dict(fn.__globals__)
    for name, helper in helpers.items():
        (scope[name],) = interpreted(helper)
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__, copy.__module__ = fn.__kwdefaults__, fn.__qualname__, fn.__module__
    return copy


def interpreted(*kernels: Any) -> tuple[Any, ...]:
    """Each kernel wrapped for Triton's interpreter, made once per kernel and reused; a kernel that
    already is one (its module imported under ``TRITON_INTERPRET=1``) is returned as it is."""
    from triton.runtime.interpreter import InterpretedFunction

    out = []
    for k in kernels:
        if isinstance(k, InterpretedFunction):  # imported under TRITON_INTERPRET=1
            out.append(k)
            continue
        key = _key(k.fn)
        if key not in _INTERPRETED:
            _INTERPRETED[key] = InterpretedFunction(_interpretable(k.fn))
        out.append(_INTERPRETED[key])
    return tuple(out)
