"""Reading the arguments of a hooked SGLang function by parameter name (the hooks' first step).

One function, :func:`bind_arguments`: SGLang's positional and keyword arguments of one call -> a dict
by parameter name with defaults filled in, so that a hook can read and replace arguments by name and
call the original with ``fn(**arguments)``.
"""

from __future__ import annotations

import inspect
from typing import Any

_BINDERS: dict[int, tuple[Any, inspect.Signature, tuple[str, ...] | None, dict[str, Any]]] = {}


def bind_arguments(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of a call of ``fn`` by parameter name, defaults filled in: what
    ``inspect.signature(fn).bind(*args, **kwargs)`` with ``apply_defaults()`` gives, and ``fn(**result)``
    is the same call. For a function whose parameters are all positional-or-keyword (SGLang's hooked
    functions) a dict built from the cached names, without ``inspect`` on the hot path (it costs tens
    of microseconds per MoE layer call); anything else through ``inspect``. Raises TypeError as
    ``bind`` does for arguments that do not fit."""
    hit = _BINDERS.get(id(fn))
    if hit is None or hit[0] is not fn:
        sig = inspect.signature(fn)
        plain = all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in sig.parameters.values())
        defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
        hit = (fn, sig, tuple(sig.parameters) if plain else None, defaults)
        _BINDERS[id(fn)] = hit
    _fn, sig, names, defaults = hit
    if names is None:  # keyword-only, positional-only or variadic parameters: inspect's own rules
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    if len(args) > len(names):
        raise TypeError(f"{getattr(fn, '__name__', fn)}() takes {len(names)} arguments, {len(args)} given")
    out = dict(zip(names, args, strict=False))  # the leading parameters
    for name, value in kwargs.items():
        if name in out or name not in names:
            raise TypeError(f"{getattr(fn, '__name__', fn)}() got an unexpected or repeated argument {name!r}")
        out[name] = value
    if len(out) < len(names):
        for name in names:
            if name not in out:
                if name not in defaults:
                    raise TypeError(f"{getattr(fn, '__name__', fn)}() missing argument {name!r}")
                out[name] = defaults[name]
    return {name: out[name] for name in names}
