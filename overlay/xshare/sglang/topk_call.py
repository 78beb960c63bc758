"""SGLang's side of one MoE layer call: the only module that reads the names of SGLang's top-k
arguments and of its ``TopKConfig``.

The routing hook wraps ``sglang.srt.layers.moe.topk._post_process_topk_ids(topk_ids, topk_weights,
topk_config, router_logits, layer_id, num_token_non_padded=None, expert_location_dispatch_info=None,
padded_rows_masked=False)``. :class:`TopkCall` reads those arguments once; :meth:`TopkCall.layer_call`
turns them into the core's :class:`~xshare.selection.decide.LayerCall`, and :meth:`TopkCall.replace`
writes a routing back as the replacement arguments. Duck-typed: sglang is imported only to ask
whether the routed scaling factor is already in the weights.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xshare.selection import Placement
from xshare.selection.decide import LayerCall, LayerRouting
from xshare.selection.knobs import SelectorKnobs
from xshare.selection.routers.spec import SCORINGS, RouterSpec

# RouterSpec per TopKConfig object (SGLang builds one per layer at load time): the spec is built and
# validated once, not per call (its checks read the correction bias on the host).
_SPECS: dict[int, tuple[Any, Any, RouterSpec | None, str | None]] = {}


def _plain(cfg: Any) -> bool:
    """A plain softmax / sigmoid top-k layer: no custom function, no bias, no groups."""
    return (getattr(cfg, "custom_routing_function", None) is None and getattr(cfg, "correction_bias", None) is None
            and not getattr(cfg, "use_grouped_topk", False)
            and getattr(cfg, "scoring_func", "softmax") in ("softmax", "sigmoid"))


def packed_outputs(cfg: Any) -> str | None:
    """Why SGLang's router also writes a packed copy of its top-k for the MoE runner (which the runner
    reads instead of ``topk_ids``, so a replacement would be ignored), or None: the fused gate's
    FlashInfer packed ids (``TopKConfig.fused_gate_packed_ids``, which SGLang's ``TopK`` keeps only
    where its gate emits them) or the experimental LoRA top-k pack on the plain softmax gate."""
    if getattr(cfg, "fused_gate_packed_ids", False):
        return "packed_topk_ids"
    if (_lora_topk_pack() and getattr(cfg, "scoring_func", "softmax") == "softmax"
            and getattr(cfg, "correction_bias", None) is None and not getattr(cfg, "use_grouped_topk", False)
            and getattr(cfg, "custom_routing_function", None) is None):
        return "lora_topk_pack"
    return None


def _lora_topk_pack() -> bool:
    """SGLang's experimental LoRA path with its fused top-k pack switched on (SGLang's own modules, when
    they are loaded: a process that never imported SGLang's top-k is not serving with it)."""
    sglang_topk = sys.modules.get("sglang.srt.layers.moe.topk")
    return sglang_topk is not None and _lora_pack_on(sglang_topk)


@functools.cache
def _lora_pack_on(sglang_topk: Any) -> bool:
    """Read once per process: the flags of SGLang's LoRA top-k pack."""
    try:
        if not getattr(sglang_topk, "_SGLANG_EXPERIMENTAL_LORA_OPTI", False):
            return False
        from sglang.srt.lora.trtllm_lora_temp.environ import lora_envs

        return bool(lora_envs.SGLANG_OPT_LORA_FUSED_TOPK_PACK.get())
    except Exception:  # noqa: BLE001 - an SGLang without that path packs nothing
        return False


def router_spec(cfg: Any) -> tuple[RouterSpec | None, str | None]:
    """(the layer's :class:`RouterSpec`, None) for a layer that needs the router-spec path; (None,
    None) for a plain top-k layer; (None, why) for a router the selector leaves to SGLang (a router it
    cannot describe, or one whose outputs SGLang also packs for its runner: :func:`packed_outputs`)."""
    packed = packed_outputs(cfg)
    if packed is not None:
        return None, packed
    if _plain(cfg):
        return None, None
    bias = getattr(cfg, "correction_bias", None)
    hit = _SPECS.get(id(cfg))
    if hit is not None and hit[0] is cfg and hit[1] is bias:
        return hit[2], hit[3]
    spec, why = None, None
    scoring = getattr(cfg, "scoring_func", "softmax")
    if scoring not in SCORINGS:
        why = f"scoring_{scoring}"
    else:
        try:
            spec = RouterSpec.from_topk_config(cfg)
        except (ValueError, AttributeError, TypeError) as exc:
            why = "custom_routing_function" if "custom_routing_function" in str(exc) else "router_config"
    if len(_SPECS) > 4096:
        _SPECS.clear()
    _SPECS[id(cfg)] = (cfg, bias, spec, why)
    return spec, why


def routed_scaling(cfg: Any) -> float | None:
    """The routed scaling factor SGLang already folded into topk_weights, if any."""
    factor = getattr(cfg, "routed_scaling_factor", None)
    if not factor or factor == 1.0:
        return None
    try:
        from sglang.srt.layers.moe.topk import is_routed_scaling_factor_fused_in_topk
    except ImportError:  # pragma: no cover - outside sglang
        fused = bool(getattr(cfg, "apply_routed_scaling_factor_on_output", False))
    else:
        fused = is_routed_scaling_factor_fused_in_topk(cfg)
    return float(factor) if fused else None


def layer_routing(cfg: Any) -> LayerRouting | RouterSpec:
    """The core's description of the layer's router: a plain :class:`LayerRouting`, or the layer's
    :class:`RouterSpec` when it needs the router-spec path."""
    spec, _ = router_spec(cfg)
    if spec is not None:
        return spec
    return LayerRouting(scoring=getattr(cfg, "scoring_func", "softmax"),
                        renormalize=bool(getattr(cfg, "renormalize", True)))


def is_draft_layer(cfg: Any) -> bool:
    """A speculative draft model's layer (SGLang does not capture its routed experts)."""
    return not getattr(cfg, "allow_routed_experts_capture", True)


@dataclass(frozen=True)
class TopkCall:
    """The arguments of one ``_post_process_topk_ids`` call that the selector reads."""

    topk_ids: Tensor  # int [T, top_k + shared slots]
    topk_weights: Tensor  # float [T, top_k + shared slots]
    router_logits: Tensor  # float [T, E]
    topk_config: Any
    layer_id: int
    num_token_non_padded: Tensor | int | None
    top_k: int  # routed experts (shared-expert slots excluded)
    shared: int  # fused shared-expert slots after the routed ones
    layer: LayerRouting | RouterSpec  # the layer's router (layer_routing), read once per call
    # SGLang's replica dispatch of the call ('static', 'dynamic', 'fake', 'lp'), or None without EPLB
    dispatch_algorithm: str | None = None

    @classmethod
    def read(cls, args: dict[str, Any], topk_config: Any) -> TopkCall:
        topk_ids: Tensor = args["topk_ids"]
        width = topk_ids.shape[1] if topk_ids.ndim == 2 else 0
        shared = int(getattr(topk_config, "num_shared_topk_slots", 0) or 0)
        top_k = width - shared if (shared and width == getattr(topk_config, "top_k", None)) else width
        return cls(topk_ids=topk_ids, topk_weights=args["topk_weights"], router_logits=args["router_logits"],
                   topk_config=topk_config, layer_id=int(args.get("layer_id") or 0),
                   num_token_non_padded=args.get("num_token_non_padded"), top_k=top_k,
                   shared=shared if top_k != width else 0, layer=layer_routing(topk_config),
                   dispatch_algorithm=getattr(args.get("expert_location_dispatch_info"), "ep_dispatch_algorithm",
                                              None))

    @property
    def num_rows(self) -> int:
        """T: the call's rows, this rank's tokens with any padding rows of a CUDA graph."""
        return int(self.topk_ids.shape[0])

    @property
    def num_experts(self) -> int:
        """E: the layer's routed experts (the router logits' columns; fused shared experts are not among them)."""
        return int(self.router_logits.shape[1])

    @property
    def engine_ids(self) -> Tensor:
        """int [T, top_k]: SGLang's own routed picks (its tie order)."""
        return self.topk_ids[:, :self.top_k] if self.shared else self.topk_ids

    def logits_match(self) -> bool:
        return self.router_logits.ndim == 2 and self.router_logits.shape[0] == self.num_rows

    def layer_call(self, *, groups: Tensor | None = None, placement: Placement | None = None,
                   knobs: SelectorKnobs | None = None, all_reduce: Any = None,
                   exact: Tensor | None = None) -> LayerCall:
        return LayerCall(router_logits=self.router_logits, top_k=self.top_k, layer=self.layer,
                         layer_id=self.layer_id, engine_ids=self.engine_ids, num_tokens=self.num_token_non_padded,
                         groups=groups, placement=placement, knobs=knobs, all_reduce=all_reduce, exact=exact,
                         engine_outputs=(self.topk_ids, self.topk_weights))

    def replace_rows(self, routed_ids: Tensor, routed_weights: Tensor, rows: Tensor) -> dict[str, Any]:
        """Router-spec layers: SGLang's outputs with the routed columns of ``rows`` (bool [T]) replaced by
        ``routed_ids`` / ``routed_weights`` [T, top_k] (already renormalised and scaled as SGLang's gate
        does); every other row and the shared-expert slots stay SGLang's own, out of place."""
        top_k = self.top_k
        pick = rows.unsqueeze(1)
        ids_out = self.topk_ids.clone()
        w_out = self.topk_weights.clone()
        ids_out[:, :top_k] = torch.where(pick, routed_ids.to(ids_out.dtype), self.topk_ids[:, :top_k])
        w_out[:, :top_k] = torch.where(pick, routed_weights.to(w_out.dtype), self.topk_weights[:, :top_k])
        return {"topk_ids": ids_out, "topk_weights": w_out}

    def replace(self, new_ids: Tensor, weights: Tensor, *, physical: bool = False) -> dict[str, Any]:
        """SGLang's outputs with the routed columns replaced (shared-expert slots kept), out of place,
        the routed scaling factor applied as SGLang applies it. ``physical``: the ids are physical
        slots the policy chose itself, so SGLang must not remap them again."""
        scale = routed_scaling(self.topk_config)
        if scale is not None:
            weights = weights * scale
        top_k = self.top_k
        if self.topk_ids.shape[1] == top_k:
            out: dict[str, Any] = {"topk_ids": new_ids.to(self.topk_ids.dtype),
                                   "topk_weights": weights.to(self.topk_weights.dtype)}
        else:
            ids_out = self.topk_ids.clone()
            w_out = self.topk_weights.clone()
            ids_out[:, :top_k] = new_ids.to(ids_out.dtype)
            w_out[:, :top_k] = weights.to(w_out.dtype)
            out = {"topk_ids": ids_out, "topk_weights": w_out}
        if physical:
            out["expert_location_dispatch_info"] = None
        return out
