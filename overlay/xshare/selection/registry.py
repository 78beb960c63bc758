"""Policy registry. A policy is one module in :mod:`xshare.selection.policies` that defines a
:class:`Policy` subclass decorated with :func:`register_policy`; modules are discovered, so adding a
policy touches no other file.

A policy declares its traits (the settings it reads, whether it uses request groups, whether
DeepEP global mode can derive its set from all-reduced statistics, which kernels implement it, how
a sweep varies it): every caller (the serving adapter, ``xshare eval``, the benchmarks, the
settings and the admin endpoint) asks the policy instead of keeping a list of names.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import ClassVar

from torch import Tensor

import xshare.selection.policies as policies_package
from xshare.selection.common import Batch, tiers_inside
from xshare.selection.config import SelectorConfig
from xshare.selection.schema import SWEEP_FIELDS
from xshare.selection.types import ModelShape

GROUP_USES = ("none", "optional", "required")
KERNELS = ("cpu", "triton")

_REGISTRY: dict[str, Policy] = {}
_DISCOVERED = False


class Policy:
    """A selection policy: turns a :class:`~xshare.selection.common.Batch` into preference tiers.

    ``tiers(batch)`` returns int64 [T, E]: each token is routed to its top_k experts by
    (tier desc, own score desc, index asc); tier 0 must mean "unusable". Shared pieces live in
    :mod:`xshare.selection.common`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # The knobs of xshare.selection.schema.SWEEP_FIELDS this policy reads: only these are swept
    # for it, and a setting it ignores is shown as unused. 'target_mass' here means the policy's set
    # honours a mass target (a config that sets one for another policy is refused, see validate).
    knobs: ClassVar[tuple[str, ...]] = ("budget", "warmup_k")
    # The keys of SelectorConfig.extra this policy reads; any other key is refused (validate()).
    extra_knobs: ClassVar[tuple[str, ...]] = ()
    # The knob a one-dimensional sweep (xshare bench serve) varies; None = nothing to vary.
    sweep_knob: ClassVar[str | None] = "budget"
    # Request groups (the request of each row, e.g. a speculative verify batch's draft tokens):
    # 'none' (ignored), 'optional' (used when the engine has them), 'required' (meaningless without).
    groups: ClassVar[str] = "none"
    needs_placement: ClassVar[bool] = False
    # DeepEP global mode: the set depends on the batch only through the all-reduced statistics
    # (column sums of gate scores and warm-up counts), so every rank can derive the same set.
    global_stats: ClassVar[bool] = False
    # Kernels that compute this policy's whole decision natively ('cpu': the C fast path, whose set
    # is XShare's; 'triton': the fused GPU kernel). Set policies (batch_set) are also routed by the
    # CPU kernel given their set.
    kernels: ClassVar[frozenset[str]] = frozenset()
    # how tokens of a replicated expert are spread over its replicas: 'spread' | 'least_loaded'
    replica_strategy: ClassVar[str] = "spread"
    # Routes every token to its own top-k (the baseline): engines may leave such a call alone.
    vanilla: ClassVar[bool] = False
    color: ClassVar[str | None] = None  # plot colour (matplotlib name); None = from the palette

    def validate_config(self, config: SelectorConfig) -> None:  # noqa: B027 - optional hook
        """Raise ValueError naming the setting when ``config`` is invalid for this policy."""

    @property
    def is_set_policy(self) -> bool:
        """Whether the policy overrides :meth:`batch_set` (one set for the whole batch)."""
        return type(self).batch_set is not Policy.batch_set

    def uses_groups(self) -> bool:
        """Whether the engine should pass request groups to this policy."""
        return self.groups != "none"

    def tiers(self, batch: Batch) -> Tensor:
        """Default for a set policy: every token prefers :meth:`batch_set`, then its own order."""
        s = self.batch_set(batch)
        if s is None:
            raise NotImplementedError(f"policy {self.name!r} defines neither tiers() nor batch_set()")
        return tiers_inside(batch, s)

    def batch_set(self, batch: Batch) -> Tensor | None:
        """bool [E]: the one expert set every token of the batch prefers (a *set policy*), or None
        when the policy's preferences are not of that form. Set policies get :meth:`tiers` for free,
        and the CPU fast path (:mod:`xshare.selection.backends.c.kernel`) routes them in C."""
        return None


def require_warmup_k(config: SelectorConfig, policy: str, meaning: str) -> None:
    """For a policy whose set is built from every token's top-k0 (k0 = ``warmup_k``, ``meaning``: what
    its paper calls it): ValueError unless ``warmup_k >= 1`` (a policy's :meth:`Policy.validate_config`)."""
    if config.warmup_k < 1:
        raise ValueError(f"warmup_k must be >= 1 for {policy} (it is {meaning})")


def _check_traits(cls: type[Policy]) -> None:
    sweepable = {f.name for f in SWEEP_FIELDS}
    bad = [k for k in cls.knobs if k not in sweepable]
    if bad:
        raise ValueError(f"policy {cls.name!r}: unknown knob(s) {bad}; knobs are {sorted(sweepable)}")
    if cls.sweep_knob is not None and cls.sweep_knob not in cls.knobs:
        raise ValueError(f"policy {cls.name!r}: sweep_knob {cls.sweep_knob!r} is not one of its knobs {cls.knobs}")
    if cls.groups not in GROUP_USES:
        raise ValueError(f"policy {cls.name!r}: groups must be one of {GROUP_USES}, got {cls.groups!r}")
    if not set(cls.kernels) <= set(KERNELS):
        raise ValueError(f"policy {cls.name!r}: kernels must be a subset of {KERNELS}, got {sorted(cls.kernels)}")
    if cls.replica_strategy not in ("spread", "least_loaded"):
        raise ValueError(f"policy {cls.name!r}: replica_strategy {cls.replica_strategy!r}")


def register_policy(cls: type[Policy]) -> type[Policy]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _check_traits(cls)
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"policy {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    for info in pkgutil.iter_modules(policies_package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{policies_package.__name__}.{info.name}")
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


def all_policies() -> list[Policy]:
    """Every registered policy, by name."""
    return [get_policy(n) for n in available_policies()]


def validate(config: SelectorConfig, model: ModelShape | None = None) -> Policy:
    """The config's policy, after checking that it exists and accepts ``config`` (ValueError
    naming the setting otherwise). Called wherever a config is used. With ``model`` (the served
    model's shape), the config is also checked against it: the one place where a setting is
    compared with the model's top_k, E and MoE layers."""
    if not isinstance(config, SelectorConfig):
        raise ValueError(f"config must be a SelectorConfig, got {type(config).__name__}")
    policy = get_policy(config.policy)  # ValueError: "unknown policy ..."
    unknown = sorted(k for k in config.extra if k not in policy.extra_knobs)
    if unknown:
        known = ", ".join(policy.extra_knobs) or "none"
        raise ValueError(f"extra: {config.policy} reads no setting {', '.join(repr(k[:64]) for k in unknown[:4])}"
                         f"{' ...' if len(unknown) > 4 else ''} (its extra settings: {known})")
    if config.target_mass is not None and "target_mass" not in policy.knobs:
        users = ", ".join(p.name for p in all_policies() if "target_mass" in p.knobs)
        raise ValueError(f"target_mass: policy {config.policy!r} has no mass target (policies with one: {users})")
    policy.validate_config(config)
    if model is not None:
        check_for_model(config, model)
    return policy


def check_for_model(config: SelectorConfig, model: ModelShape) -> None:
    """Raise ValueError naming the setting when ``config`` cannot apply to ``model``: the budget
    (as resolved for E) in [top_k, E], warmup_k and anchor_k <= top_k, group_budget and gpu_cap <= E. The value
    ranges of the schema (:data:`~xshare.selection.schema.INT_MAX`) are checked by the config itself."""
    from collections.abc import Mapping

    e, k = model.num_experts, model.top_k
    values = config.budget if isinstance(config.budget, tuple) else \
        tuple(config.budget.values()) if isinstance(config.budget, Mapping) else (config.budget,)
    for budget in values:  # per-layer budgets: every value (None: the default, E with a mass target)
        resolved = budget if isinstance(budget, int) else config.replace(budget=budget).budget_for(e)
        if not k <= resolved <= e:
            shown = "budget (not given: the default)" if budget is None else f"budget {budget!r}"
            raise ValueError(f"{shown} is outside [top_k, E] = [{k}, {e}] for this model"
                             + (f" (it resolves to {resolved})" if not isinstance(budget, int) else ""))
    if config.warmup_k > k:
        raise ValueError(f"warmup_k = {config.warmup_k} exceeds the model's top_k = {k}")
    if config.anchor_k is not None and config.anchor_k > k:
        raise ValueError(f"anchor_k = {config.anchor_k} exceeds the model's top_k = {k}")
    if isinstance(config.group_budget, int) and config.group_budget > e:
        raise ValueError(f"group_budget = {config.group_budget} exceeds the model's E = {e}")
    if config.gpu_cap is not None and config.gpu_cap > e:
        raise ValueError(f"gpu_cap = {config.gpu_cap} exceeds the model's E = {e}")
    check_per_layer(config, model)


def check_per_layer(config: SelectorConfig, model: ModelShape) -> None:
    """Per-layer settings (a list, or a map of layer ids) against the model's MoE layers."""
    from collections.abc import Mapping

    from xshare.selection.config import PER_LAYER
    from xshare.selection.schema import DEFAULT_KEY

    layers = tuple(model.moe_layers)
    for name in PER_LAYER:
        value = getattr(config, name)
        if isinstance(value, tuple):
            if not layers:
                raise ValueError(f"{name}: a per-layer list needs the model's MoE layers, which are unknown; "
                                 f"use a map {{\"default\": v, \"<layer id>\": v}}")
            if len(value) != len(layers):
                raise ValueError(f"{name}: a per-layer list has {len(value)} values, the model has {len(layers)} "
                                 f"MoE layers ({_layer_text(layers)})")
        elif isinstance(value, Mapping) and layers:
            unknown = [k for k in value if k != DEFAULT_KEY and int(k) not in layers]
            if unknown:
                raise ValueError(f"{name}: unknown MoE layer id(s) {', '.join(unknown)} (the model's MoE layers: "
                                 f"{_layer_text(layers)})")


def _layer_text(layers: tuple[int, ...]) -> str:
    if layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def validated(config: SelectorConfig, model: ModelShape | None = None) -> SelectorConfig:
    """``config`` itself, after :func:`validate`."""
    validate(config, model)
    return config
