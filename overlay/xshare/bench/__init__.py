"""Benchmarks behind ``xshare bench MODE``.

Each mode is one module here defining ``MODE`` (its name on the command line), ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; :func:`modes` discovers them, so adding a mode
(e.g. ``serve.py`` for ``xshare bench serve``) adds one file and touches nothing else. Modules whose
name starts with ``_`` hold shared helpers.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

_REQUIRED = ("MODE", "HELP", "add_arguments", "run")


def modes() -> dict[str, ModuleType]:
    """Benchmark modes by name, sorted."""
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        missing = [a for a in _REQUIRED if not hasattr(mod, a)]
        if missing:
            raise RuntimeError(f"benchmark module {mod.__name__} lacks {', '.join(missing)}")
        if mod.MODE in found:
            raise RuntimeError(f"benchmark mode {mod.MODE!r} defined twice")
        found[mod.MODE] = mod
    return found
