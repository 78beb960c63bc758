"""The seam between a serving engine and the selection core: the typed per-layer call an engine
hands over (:class:`LayerCall`), the layer's router description (:class:`LayerRouting` or a
:class:`~xshare.selection.routers.spec.RouterSpec`), and what comes back (:class:`Decision`).

:func:`xshare.selection.decide.decide` takes a ``LayerCall`` and a
:class:`~xshare.selection.config.SelectorConfig` and returns a ``Decision``; the backends
(:mod:`xshare.selection.backends`) read the call and write the decision. Pure data, no routing here.

Tie order. An engine's own top-k (``torch.topk`` over float32 gate probabilities in SGLang) breaks
exact ties in an implementation-defined order; the core breaks them by the lower expert index.
Router logits in bf16 tie often. A token whose own top-k contains such a tie would then get a
different (equally scored) expert from the selector even when the policy keeps every expert, and
the model's output would change. With ``engine_ids`` each token's preference order is: usable
first, then gate score, then the engine's own pick (in the engine's column order), then the expert
index. Every policy reads that order (``Batch.rank``), so a token's "own top-k" is exactly the
engine's, and with a budget >= E the routing, its column order and its weights are bitwise the
engine's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from xshare.selection.config import SelectorConfig
from xshare.selection.knobs import SelectorKnobs
from xshare.selection.registry import Policy
from xshare.selection.routers.spec import RouterSpec
from xshare.selection.types import Placement, Routing

AllReduce = Callable[[Tensor], Tensor]  # sums a tensor over the EP group; may be in place or not


@dataclass(frozen=True)
class LayerRouting:
    """How a layer's router turns logits into routing (from the engine's layer description).

    scoring      'softmax' | 'sigmoid': gate scores from router logits.
    renormalize  each token's kept weights are renormalised to sum to 1 (norm_topk_prob).
    """

    scoring: str = "softmax"
    renormalize: bool = True


@dataclass(frozen=True)
class LayerCall:
    """One MoE layer call of one forward batch, as the engine hands it to the core.

    router_logits  float [T, E]; -inf marks an expert a token cannot use.
    top_k          routed experts per token (shared-expert slots excluded).
    layer          the layer's router: a :class:`LayerRouting` (plain softmax / sigmoid top-k), or a
                   :class:`~xshare.selection.routers.spec.RouterSpec` (correction bias, expert groups,
                   routed scaling, shared slot, recognised custom functions).
    layer_id       the MoE layer's index (bookkeeping only).
    engine_ids     int [T, k]: the engine's own picks, whose order breaks exact ties (or None).
    num_tokens     rows >= num_tokens are padding (an int or a 0-d device tensor; None = all valid).
    groups         int [T]: the request of each row (passed to policies that use request groups).
    placement      :class:`Placement` of the layer's experts: required by GPU-aware policies; with
                   replicas, every policy's routing also gets physical slots.
    knobs          :class:`SelectorKnobs` (device tensors read instead of the config's numbers).
    all_reduce     DeepEP global mode: sums a float32 [2E] tensor over the EP group (or None).
    exact          bool [T]: rows that keep the engine's own routing exactly (per-request exact
                   routing; their experts are forced into the policy's set), or None.
    engine_outputs (ids, weights) [T, W]: the engine's whole outputs (routed columns first, then its
                   shared-expert slots), for a backend that writes a router-spec call's replacement in
                   their layout (``Decision.outputs``), or None.
    validate       also check values (NaN / +inf logits, placement ids): a host sync, so the serving
                   path leaves it False (:func:`xshare.selection.select` passes its own ``validate``).
    engine_gate    the engine has not run its gate for this call (``engine_ids`` and ``engine_outputs``
                   None): the backend computes the engine's picks and outputs itself, bitwise, and
                   writes the replacement from them. Only a backend that implements the layer's gate
                   takes such a call (:func:`xshare.selection.decide.gate_deferrable`); the others raise.
    """

    router_logits: Tensor
    top_k: int
    layer: LayerRouting | RouterSpec = LayerRouting()
    layer_id: int = 0
    engine_ids: Tensor | None = None
    num_tokens: int | Tensor | None = None
    groups: Tensor | None = None
    placement: Placement | Tensor | None = None
    knobs: SelectorKnobs | None = None
    all_reduce: AllReduce | None = None
    exact: Tensor | None = None
    engine_outputs: tuple[Tensor, Tensor] | None = None
    validate: bool = False
    engine_gate: bool = False

    def groups_for(self, policy: Policy) -> Tensor | None:
        """The request groups ``policy`` sees: the call's, when the policy uses them, else None."""
        return self.groups if policy.uses_groups() else None


@dataclass(frozen=True)
class Decision:
    """What :func:`~xshare.selection.decide.decide` returns: the routing, and the CPU kernel's
    by-products when it routed."""

    routing: Routing
    config: SelectorConfig  # the config the layer was routed with (the layer's scoring applied)
    cpu: object | None = None  # xshare.selection.backends.c.kernel.CpuRouting when the C fast path routed
    # Router specs only: bool [T], the rows whose routing the policy changed (every other row keeps
    # the engine's own routing verbatim), and int64 0-d, the restricted rows that could not be filled
    # inside their groups from the set and kept the engine's routing (the fallback, counted).
    replaced: Tensor | None = None
    short_rows: Tensor | None = None
    # The engine's outputs (LayerCall.engine_outputs' layout) with the replaced rows' routed columns
    # rewritten, when the backend wrote them itself; else the caller merges routing and replaced.
    outputs: tuple[Tensor, Tensor] | None = None
    # What routed the call ('triton', 'c' or 'torch'), and why torch where the config's backend asked
    # for another (:func:`~xshare.selection.decide.choose_backend`; None when the wanted backend routed it).
    backend: str = "torch"
    reason: str | None = None


def plain_layer(spec: RouterSpec) -> LayerRouting | None:
    """The :class:`LayerRouting` of a spec the plain path routes (softmax / sigmoid top-k, no bias,
    no groups, no custom function, no scaling inside the weights), else None."""
    if spec.gate != "plain" or spec.correction_bias is not None or spec.scoring not in ("softmax", "sigmoid"):
        return None
    if spec.scaling_in_weights:
        return None
    return LayerRouting(spec.scoring, spec.renormalize)


_LAYER_CONFIGS: dict[tuple[int, LayerRouting], tuple[SelectorConfig, SelectorConfig]] = {}


def layer_config(config: SelectorConfig, layer: LayerRouting | RouterSpec) -> SelectorConfig:
    """``config`` with the layer's own scoring and renormalisation (cached per config and layer). For
    a :class:`RouterSpec` the config's scoring only says how figures read the logits (softmax for a
    softmax gate, else sigmoid); the spec itself defines the gate."""
    if isinstance(layer, RouterSpec):
        layer = plain_layer(layer) or LayerRouting("softmax" if layer.scoring == "softmax" else "sigmoid",
                                                   layer.renormalize)
    if config.scoring == layer.scoring and config.renormalize == layer.renormalize:
        return config
    key = (id(config), layer)
    hit = _LAYER_CONFIGS.get(key)
    if hit is not None and hit[0] is config:
        return hit[1]
    if len(_LAYER_CONFIGS) > 256:
        _LAYER_CONFIGS.clear()
    out = config.replace(scoring=layer.scoring, renormalize=bool(layer.renormalize))
    _LAYER_CONFIGS[key] = (config, out)
    return out
