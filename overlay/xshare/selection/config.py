"""The selector's configuration: plain, immutable data, its fields checked at construction.

The fields, their types, ranges and defaults are :data:`xshare.selection.schema.SELECTOR_FIELDS`
(one definition); a test keeps this dataclass equal to it. Whether the named policy exists and
accepts these values is checked where a config is used (:func:`xshare.selection.registry.validate`,
called by :func:`xshare.selection.select`, the plugin's settings, the admin endpoint and the CLIs),
so this module imports no policy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from xshare.selection.schema import DEFAULT_KEY, SELECTOR, SELECTOR_FIELDS, freeze_layers, is_int, parse_count

PER_LAYER = tuple(f.name for f in SELECTOR_FIELDS if f.per_layer)

__all__ = ["DEFAULT_BUDGET", "SCORINGS", "SelectorConfig", "parse_count", "resolve_count"]

SCORINGS = SELECTOR["scoring"].choices
# m when no budget is given and no mass target is set: half of the layer's experts. With a mass
# target and no budget given, m is E: the target alone decides (SelectorConfig.budget_for).
DEFAULT_BUDGET = 0.5


def resolve_count(value: int | float, num_experts: int) -> int:
    """An absolute count (clamped to ``num_experts``) or a fraction of ``num_experts`` (rounded up)."""
    if is_int(value):
        return min(int(value), num_experts)
    return max(1, min(num_experts, math.ceil(float(value) * num_experts - 1e-9)))


@dataclass(frozen=True)
class SelectorConfig:
    """How one MoE layer's experts are selected for one forward batch.

    policy        registered policy name (see :func:`xshare.selection.available_policies`).
    budget        m: max experts kept per layer and batch; an int >= 1, or a float in (0, 1] = a
                  fraction of the layer's experts E. Values above E are clamped to E. None = not
                  given: :data:`DEFAULT_BUDGET` of E, or E when a mass target is set (the target is
                  then uncapped); this None is the one record of "not given", so it survives
                  :meth:`to_dict` / :meth:`from_dict` (persisted and signed configs, the admin
                  endpoint). Like ``target_mass``, also one value per MoE layer (a tuple in MoE-layer
                  order, or a map {"default": v, "<layer id>": v}; a layer without one has None);
                  :meth:`for_layer` gives a layer's own config.
    target_mass   tau in (0, 1]: S is the fewest experts (warm-up included) whose summed gate mass
                  over the batch reaches tau of the batch's total, capped by the budget when one is
                  given; None = the budget alone. Read by the policies with ``Policy.target_mass``.
    warmup_k      k0: every token's top-k0 experts are always kept (0 = no warm-up).
    group_budget  m_r: per-request budget of hierarchical policies (``xshare_spec``); None = top_k.
    anchor_k      hierarchical policies: the first row of each request with several rows (in a verify
                  batch, the accepted token: its output is kept whatever the drafts' fate) keeps its
                  own top-anchor_k experts in its request's set; None = top_k (its own routing), 0 = its
                  warm-up only, like the other rows.
    gpu_cap       c: per-GPU cap of GPU-aware policies; None = ceil(m / G).
    scoring       'softmax' | 'sigmoid': how router logits become gate scores.
    renormalize   renormalise each token's kept weights to sum to 1 (the model's norm_topk_prob).
    min_tokens, max_tokens
                  batch-size range where the policy applies; outside it, routing is exactly 'topk'.
    backend       what routes a call: 'auto' (the fused Triton kernel on CUDA tensors, the C kernel on
                  the CPU, the torch reference where neither implements the call), or 'triton', 'c',
                  'torch' forced (:func:`xshare.selection.decide.decide`).
    extra         policy-specific numeric knobs (validated by the policy), e.g. Lynx's bins.
    """

    policy: str = SELECTOR["policy"].default
    budget: Any = SELECTOR["budget"].default  # int | float | None (not given), or per MoE layer (tuple / map)
    target_mass: Any = SELECTOR["target_mass"].default  # float | None, or per MoE layer
    warmup_k: int = SELECTOR["warmup_k"].default
    group_budget: int | float | None = SELECTOR["group_budget"].default
    anchor_k: int | None = SELECTOR["anchor_k"].default
    gpu_cap: int | None = SELECTOR["gpu_cap"].default
    scoring: str = SELECTOR["scoring"].default
    renormalize: bool = SELECTOR["renormalize"].default
    min_tokens: int = SELECTOR["min_tokens"].default
    max_tokens: int | None = SELECTOR["max_tokens"].default
    backend: str = SELECTOR["backend"].default
    extra: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in SELECTOR_FIELDS:  # in schema order: the first bad field is named
            f.validate(getattr(self, f.name))
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens must be None or an int >= min_tokens, got {self.max_tokens!r}")
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))
        for name in PER_LAYER:
            v = getattr(self, name)
            if isinstance(v, (list, tuple, Mapping)):
                object.__setattr__(self, name, freeze_layers(v))

    @property
    def per_layer(self) -> bool:
        """Whether a setting has one value per MoE layer (resolve a layer's with :meth:`for_layer`)."""
        return any(isinstance(getattr(self, n), (tuple, Mapping)) for n in PER_LAYER)

    def layer_value(self, name: str, layer_id: int, moe_layers: Sequence[int] = ()) -> Any:
        """The value of setting ``name`` on MoE layer ``layer_id``: a list is indexed by the layer's
        position in ``moe_layers`` (ValueError when it is not there), a map by the id, then 'default',
        then the setting's default."""
        v = getattr(self, name)
        if isinstance(v, tuple):
            layers = list(moe_layers)
            if layer_id not in layers or len(layers) != len(v):
                raise ValueError(f"{name}: a per-layer list of {len(v)} values needs the model's MoE layers "
                                 f"({len(layers)} known); layer {layer_id} is not one of them")
            return v[layers.index(layer_id)]
        if isinstance(v, Mapping):
            key = str(layer_id)
            return v[key] if key in v else v.get(DEFAULT_KEY, SELECTOR[name].default)
        return v

    def for_layer(self, layer_id: int, moe_layers: Sequence[int] = ()) -> SelectorConfig:
        """This config with every per-layer setting resolved for MoE layer ``layer_id`` (itself when
        nothing is per layer; cached)."""
        if not self.per_layer:
            return self
        key = (layer_id, tuple(moe_layers))
        cache = self.__dict__.setdefault("_layers", {})
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = self.replace(**{n: self.layer_value(n, layer_id, moe_layers) for n in PER_LAYER})
        return hit

    def scalar_value(self, name: str) -> Any:
        """One number for a per-layer setting where one is shown (a gauge, a summary): a map's
        'default', the largest value of a list (None values count as off)."""
        v = getattr(self, name)
        if isinstance(v, tuple):
            present = [x for x in v if x is not None]
            return max(present) if present else None
        if isinstance(v, Mapping):
            return v.get(DEFAULT_KEY, SELECTOR[name].default)
        return v

    @property
    def has_target_mass(self) -> bool:
        """Whether a mass target is set (per-layer values: on any layer)."""
        v = self.target_mass
        if isinstance(v, tuple):
            return any(x is not None for x in v)
        if isinstance(v, Mapping):
            return any(x is not None for x in v.values())
        return v is not None

    def budget_for(self, num_experts: int) -> int:
        """m for a layer of ``num_experts`` experts: the budget given, else E with a mass target (no
        cap), else :data:`DEFAULT_BUDGET` of E. Per-layer values: the largest of them (resolve a
        layer's own with :meth:`for_layer` first)."""
        if isinstance(self.budget, (tuple, Mapping)):
            values = self.budget if isinstance(self.budget, tuple) else [self.scalar_value("budget"),
                                                                           *self.budget.values()]
            return max(self._resolve_budget(v, num_experts) for v in values)
        return self._resolve_budget(self.budget, num_experts)

    def _resolve_budget(self, value: int | float | None, num_experts: int) -> int:
        if value is None:
            return num_experts if self.has_target_mass else resolve_count(DEFAULT_BUDGET, num_experts)
        return resolve_count(value, num_experts)

    def group_budget_for(self, num_experts: int, top_k: int) -> int:
        """m_r for a layer of ``num_experts`` experts (default: top_k)."""
        if self.group_budget is None:
            return min(top_k, num_experts)
        return resolve_count(self.group_budget, num_experts)

    def anchor_k_for(self, top_k: int) -> int:
        """The experts the first row of a multi-row request keeps (default: top_k), at least the warm-up."""
        return max(top_k if self.anchor_k is None else min(self.anchor_k, top_k), self.warmup_k)

    def applies_to(self, num_tokens: int) -> bool:
        """Whether a batch of ``num_tokens`` rows is inside [min_tokens, max_tokens]."""
        return num_tokens >= self.min_tokens and (self.max_tokens is None or num_tokens <= self.max_tokens)

    def replace(self, **changes: Any) -> SelectorConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["extra"] = dict(self.extra)
        for name in PER_LAYER:  # JSON-ready: a list, or a plain dict
            if isinstance(d[name], tuple):
                d[name] = list(d[name])
            elif isinstance(d[name], Mapping):
                d[name] = dict(d[name])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SelectorConfig:
        """Build from a mapping; unknown keys are an error naming the key."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown selector setting(s): {', '.join(unknown)}")
        return cls(**dict(data))
