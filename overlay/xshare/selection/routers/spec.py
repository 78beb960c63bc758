"""Router families as typed values: :class:`RouterSpec`, one MoE layer's router as SGLang 0.5.23 computes it.

A layer's router is described by a :class:`RouterSpec` (scoring, correction bias, expert groups,
renormalisation, routed scaling, a fused shared-expert slot, recognised custom routing functions).
:func:`reference_route` is the routing SGLang 0.5.23's torch path computes for that spec, with an
optional ``allowed`` mask (the experts that exist); :func:`router_scores` gives the per-expert
quantities a batch objective works on. Pure torch, no SGLang import.

Which SGLang function a spec mirrors (``RouterSpec.gate``; all in ``sglang/srt/layers/moe/topk.py``,
the functions ``select_experts`` reaches on a CPU without AMX, which are also SGLang's CUDA fallbacks):

==================  ========================================================================  ==========
``gate``            SGLang function                                                           compiled?
==================  ========================================================================  ==========
``plain``           ``fused_topk_torch_native`` (softmax / sigmoid / sqrtsoftplus, with or     eager
                    without bias), then ``select_experts``' routed-scaling fold
``grouped``         ``grouped_topk_gpu`` (softmax or sigmoid, group score = max, no bias)      torch.compile
``biased_grouped``  ``biased_grouped_topk_impl`` (sigmoid + bias, group score = sum of the      torch.compile
                    top-2 biased scores); GLM-4.5 / Kimi-K2 are the one-group case
``llama4``          ``Llama4MoE.custom_routing_function`` (``models/llama4.py``): top-k raw    torch.compile
                    logits, weight = sigmoid(logit) in the hidden-states dtype
==================  ========================================================================  ==========
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from xshare.selection.types import FLOAT_DTYPES

SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")
CUSTOM_ROUTERS = ("llama4",)
GATES = ("plain", "grouped", "biased_grouped", "llama4")

_FLOAT_DTYPES = FLOAT_DTYPES
_LLAMA4_QUALNAME = "Llama4MoE.custom_routing_function"


@dataclass(frozen=True, eq=False, repr=False)
class RouterSpec:
    """One MoE layer's router as SGLang 0.5.23 computes it (frozen, validated when built).

    scoring                 'softmax', 'sigmoid' or 'sqrtsoftplus' (DeepSeek-V4's sqrt(softplus(x)));
                            SGLang's biased grouped gate always uses sigmoid, so a spec with groups
                            and a bias must say 'sigmoid'.
    correction_bias         float Tensor [E] (a [1, E] tensor is flattened) added to the scores to
                            choose experts only (DeepSeek's e_score_correction_bias), or None.
    num_expert_group        None: SGLang's use_grouped_topk=False. An int G >= 1: grouped top-k over G
                            contiguous groups of E / G experts (GLM-4.5 and Kimi-K2 use G = 1, which
                            still runs SGLang's grouped code).
    topk_group              groups kept per token (1 <= topk_group <= G); set iff num_expert_group is.
    renormalize             divide the routed weights by their sum (+ 1e-20), SGLang's renormalize.
    routed_scaling_factor   the model's routed scaling factor, or None.
    scaling_in_weights      SGLang's TopKConfig.apply_routed_scaling_factor_on_output: True when the
                            router multiplies the weights by the factor (is_routed_scaling_factor_fused_in_topk
                            is then True and the MoE layer does not scale its output again); False when
                            the MoE layer scales its output later and the weights do not carry it.
    num_fused_shared_experts  0 or 1 shared-expert slot written by the router as the last column (id E),
                            SGLang's num_shared_topk_slots; grouped gates only (SGLang's torch gates
                            write exactly one such column).
    fused_shared_experts_scaling_factor  multiplier select_experts applies to the shared column
                            afterwards (SGLang passes 1 / ep_size under standard EP), or None.
    custom                  a recognised custom routing function: 'llama4' (top-k of the raw logits,
                            weight = sigmoid(logit), no renormalisation), or None.
    weight_dtype            'llama4' only: the hidden-states dtype its function casts the weights to
                            (None: the router logits' dtype).

    Raises ValueError naming the field.
    """

    scoring: str = "softmax"
    correction_bias: Tensor | None = None
    num_expert_group: int | None = None
    topk_group: int | None = None
    renormalize: bool = True
    routed_scaling_factor: float | None = None
    scaling_in_weights: bool = False
    num_fused_shared_experts: int = 0
    fused_shared_experts_scaling_factor: float | None = None
    custom: str | None = None
    weight_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        bias = self.correction_bias
        if bias is not None:
            if not isinstance(bias, Tensor) or bias.dtype not in _FLOAT_DTYPES:
                raise ValueError("correction_bias must be a float tensor [E] or [1, E]")
            if bias.ndim == 2 and bias.shape[0] == 1:
                bias = bias.reshape(-1)
            if bias.ndim != 1 or bias.numel() < 1:
                shape = tuple(self.correction_bias.shape)
                raise ValueError(f"correction_bias must have shape [E] or [1, E], got {shape}")
            if _values_readable(bias) and (bool(torch.isnan(bias).any()) or bool(torch.isposinf(bias).any())):
                raise ValueError("correction_bias contains NaN or +inf")
            object.__setattr__(self, "correction_bias", bias)
        for name in ("renormalize", "scaling_in_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        groups, keep = self.num_expert_group, self.topk_group
        if (groups is None) != (keep is None):
            raise ValueError("num_expert_group and topk_group must both be set or both be None "
                             f"(got num_expert_group={groups!r}, topk_group={keep!r})")
        if groups is not None:
            if not _is_int(groups) or groups < 1:
                raise ValueError(f"num_expert_group must be an int >= 1, got {groups!r}")
            if not _is_int(keep) or not 1 <= keep <= groups:
                raise ValueError(f"topk_group must be an int in [1, num_expert_group={groups}], got {keep!r}")
        rsf = self.routed_scaling_factor
        if rsf is not None:
            if isinstance(rsf, bool) or not isinstance(rsf, (int, float)) or not math.isfinite(rsf) or rsf <= 0:
                raise ValueError(f"routed_scaling_factor must be a finite number > 0 or None, got {rsf!r}")
            object.__setattr__(self, "routed_scaling_factor", float(rsf))
        if self.scaling_in_weights and rsf is None:
            raise ValueError("scaling_in_weights needs a routed_scaling_factor")
        shared = self.num_fused_shared_experts
        if not _is_int(shared) or shared not in (0, 1):
            raise ValueError(f"num_fused_shared_experts must be 0 or 1, got {shared!r}")
        if shared and groups is None:
            raise ValueError("num_fused_shared_experts needs a grouped gate (num_expert_group): "
                             "SGLang's other torch gates do not write a shared column")
        factor = self.fused_shared_experts_scaling_factor
        if factor is not None:
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
                raise ValueError(f"fused_shared_experts_scaling_factor must be a finite number or None, got {factor!r}")
            object.__setattr__(self, "fused_shared_experts_scaling_factor", float(factor))
        if self.custom is not None and self.custom not in CUSTOM_ROUTERS:
            raise ValueError(f"custom must be one of {CUSTOM_ROUTERS} or None, got {self.custom!r}")
        if self.custom == "llama4":
            if self.scoring != "sigmoid":
                raise ValueError("scoring must be 'sigmoid' for custom='llama4' (weight = sigmoid(logit))")
            if bias is not None or groups is not None:
                raise ValueError("custom='llama4' takes no correction_bias and no num_expert_group")
            if self.renormalize:
                raise ValueError("renormalize must be False for custom='llama4' (its function never renormalises)")
        if self.weight_dtype is not None:
            if self.weight_dtype not in _FLOAT_DTYPES:
                raise ValueError(f"weight_dtype must be a float dtype or None, got {self.weight_dtype!r}")
            if self.custom != "llama4":
                raise ValueError("weight_dtype only applies to custom='llama4'")
        if groups is not None and bias is not None and self.scoring != "sigmoid":
            raise ValueError("scoring must be 'sigmoid' with num_expert_group and a correction_bias: "
                             "SGLang's biased grouped gate always scores with sigmoid")
        if groups is not None and bias is None and self.scoring == "sqrtsoftplus":
            raise ValueError("scoring 'sqrtsoftplus' is not supported by SGLang's grouped gate (grouped_topk_gpu)")

    def __repr__(self) -> str:
        parts = []
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "correction_bias" and value is not None:
                value = f"<{value.dtype} [{value.numel()}]>"
            else:
                value = repr(value)
            parts.append(f"{name}={value}")
        return f"RouterSpec({', '.join(parts)})"

    def to_meta(self) -> dict[str, object]:
        """The spec as plain JSON values, the correction bias aside (a trace stores the biases of its
        layers as an array): ``has_correction_bias`` says whether there is one."""
        out: dict[str, object] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "correction_bias":
                out["has_correction_bias"] = value is not None
            elif name == "weight_dtype":
                out[name] = None if value is None else str(value).removeprefix("torch.")
            else:
                out[name] = value
        return out

    @classmethod
    def from_meta(cls, meta: dict[str, object], correction_bias: Tensor | None = None) -> RouterSpec:
        """The spec :meth:`to_meta` wrote, with its bias. Raises ValueError naming the field."""
        if not isinstance(meta, dict):
            raise ValueError(f"a router description must be a JSON object, got {type(meta).__name__}")
        fields = dict(meta)
        has_bias = fields.pop("has_correction_bias", correction_bias is not None)
        if bool(has_bias) != (correction_bias is not None):
            raise ValueError("the router description says has_correction_bias = "
                             f"{bool(has_bias)} but a correction bias was {'not ' if has_bias else ''}given")
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown router field(s): {', '.join(unknown)}")
        dtype = fields.get("weight_dtype")
        if dtype is not None:
            fields["weight_dtype"] = getattr(torch, str(dtype), None)
            if not isinstance(fields["weight_dtype"], torch.dtype):
                raise ValueError(f"weight_dtype must name a torch float dtype, got {dtype!r}")
        return cls(correction_bias=correction_bias, **fields)

    @property
    def gate(self) -> str:
        """Which SGLang gate this spec runs: 'plain', 'grouped', 'biased_grouped' or 'llama4'."""
        if self.custom == "llama4":
            return "llama4"
        if self.num_expert_group is None:
            return "plain"
        return "grouped" if self.correction_bias is None else "biased_grouped"

    @property
    def num_experts(self) -> int | None:
        """E when the spec knows it (from the bias), else None."""
        return None if self.correction_bias is None else int(self.correction_bias.numel())

    def check(self, num_experts: int, top_k: int) -> None:
        """Validate against a layer of ``num_experts`` experts routing ``top_k`` experts per token
        (shared slot not counted). Raises ValueError naming the argument."""
        if not _is_int(top_k) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        width = top_k + self.num_fused_shared_experts
        if width > num_experts:
            raise ValueError(f"top_k = {top_k} (+ {self.num_fused_shared_experts} shared slot) exceeds "
                             f"the number of experts E = {num_experts}")
        if self.correction_bias is not None and self.correction_bias.numel() != num_experts:
            raise ValueError(f"correction_bias has {self.correction_bias.numel()} entries, router_logits "
                             f"has E = {num_experts}")
        if self.num_expert_group is not None:
            groups = self.num_expert_group
            if num_experts % groups:
                raise ValueError(f"num_expert_group = {groups} does not divide E = {num_experts}")
            per_group = num_experts // groups
            if self.topk_group * per_group < width:
                raise ValueError(f"topk_group = {self.topk_group} groups of {per_group} experts cannot hold "
                                 f"top_k = {width} experts")
            if self.gate == "biased_grouped" and per_group < 2:
                raise ValueError("num_expert_group leaves fewer than 2 experts per group: SGLang's biased "
                                 "grouped gate scores a group by its two best experts")

    @classmethod
    def from_topk_config(cls, topk_config: object, *, weight_dtype: torch.dtype | None = None) -> RouterSpec:
        """Build the spec of an SGLang ``TopKConfig`` (read by attribute; SGLang is not imported).

        The routed top_k to pass to :func:`reference_route` is ``topk_config.top_k`` minus its
        shared slots (:func:`routed_top_k`). Raises ValueError for a custom routing function that is
        not recognised.
        """
        get = topk_config.__getattribute__
        custom_fn = get("custom_routing_function")
        custom = None
        if custom_fn is not None:
            name = getattr(custom_fn, "__qualname__", "") or ""
            if name.endswith(_LLAMA4_QUALNAME):
                custom = "llama4"
            else:
                raise ValueError(f"custom_routing_function {name or custom_fn!r} is not a recognised router "
                                 f"(known: {CUSTOM_ROUTERS})")
        grouped = bool(get("use_grouped_topk"))
        bias = get("correction_bias")
        scoring = get("scoring_func")
        if grouped and bias is not None:
            scoring = "sigmoid"  # SGLang's biased grouped gate ignores scoring_func
        if custom == "llama4":
            scoring = "sigmoid"
        return cls(
            scoring=scoring,
            correction_bias=None if bias is None else bias.detach(),
            num_expert_group=int(get("num_expert_group")) if grouped else None,
            topk_group=int(get("topk_group")) if grouped else None,
            renormalize=bool(get("renormalize")) if custom is None else False,
            routed_scaling_factor=get("routed_scaling_factor"),
            scaling_in_weights=bool(get("apply_routed_scaling_factor_on_output")),
            num_fused_shared_experts=int(getattr(topk_config, "num_shared_topk_slots", 0)),
            fused_shared_experts_scaling_factor=get("fused_shared_experts_scaling_factor"),
            custom=custom,
            weight_dtype=weight_dtype if custom == "llama4" else None,
        )


def routed_top_k(topk_config: object) -> int:
    """The routed experts per token of an SGLang ``TopKConfig`` (its top_k less the shared slots)."""
    return int(topk_config.top_k) - int(getattr(topk_config, "num_shared_topk_slots", 0))


def _values_readable(t: Tensor) -> bool:
    """Whether ``t``'s values can be read on the host here without breaking anything: not a shape-only
    (meta) tensor, and not a CUDA tensor while a CUDA graph is being captured (a host read would end
    the capture). A spec built under capture skips its value checks; SGLang builds its TopKConfig
    once at load time, and the plugin reads it then (the coverage report), so that is an edge case."""
    if t.device.type == "meta":
        return False
    if t.device.type == "cuda":
        return not torch.cuda.is_current_stream_capturing()
    return True


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
