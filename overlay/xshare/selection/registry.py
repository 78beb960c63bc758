"""Policy registry. A policy is one module in :mod:`xshare.selection.policies` that defines a
:class:`Policy` subclass decorated with :func:`register_policy`; modules are discovered, so adding a
policy touches no other file."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from xshare.selection.common import Batch
    from xshare.selection.config import SelectorConfig

_REGISTRY: dict[str, Policy] = {}
_DISCOVERED = False


class Policy:
    """A selection policy: turns a :class:`~xshare.selection.common.Batch` into preference tiers.

    ``tiers(batch)`` returns int64 [T, E]: each token is routed to its top_k experts by
    (tier desc, own score desc, index asc); tier 0 must mean "unusable". Shared pieces live in
    :mod:`xshare.selection.common`.
    """

    name: ClassVar[str] = ""
    needs_placement: ClassVar[bool] = False
    # how tokens of a replicated expert are spread over its replicas: 'spread' | 'least_loaded'
    replica_strategy: ClassVar[str] = "spread"
    summary: ClassVar[str] = ""

    def validate_config(self, config: SelectorConfig) -> None:  # noqa: B027 - optional hook
        """Raise ValueError naming the setting when ``config`` is invalid for this policy."""

    def tiers(self, batch: Batch) -> Tensor:
        """Default for a set policy: every token prefers :meth:`batch_set`, then its own order."""
        from xshare.selection.common import tiers_inside

        s = self.batch_set(batch)
        if s is None:
            raise NotImplementedError(f"policy {self.name!r} defines neither tiers() nor batch_set()")
        return tiers_inside(batch, s)

    def batch_set(self, batch: Batch) -> Tensor | None:
        """bool [E]: the one expert set every token of the batch prefers (a *set policy*), or None
        when the policy's preferences are not of that form. Set policies get :meth:`tiers` for free,
        and the CPU fast path (:mod:`xshare.selection.kernels.cpu`) routes them in C."""
        return None


def register_policy(cls: type[Policy]) -> type[Policy]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"policy {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    from xshare.selection import policies

    for info in pkgutil.iter_modules(policies.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{policies.__name__}.{info.name}")
    _DISCOVERED = True


def get_policy(name: str) -> Policy:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(available_policies())}") from None


def available_policies() -> list[str]:
    _discover()
    return sorted(_REGISTRY)
