"""Router families as typed values, and SGLang 0.5.23's own torch routing, restricted to a set of experts.

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

Bitwise equality with SGLang (``allowed`` None or all True): ids, column order and weights are
equal for fp32 and bf16 logits, ties included, on the CPU (tests/test_gates_sglang.py). Three
things make that possible and are done here on purpose:

* the ``torch.compile``'d gates compute their float32 reductions the way Inductor's CPU code does:
  one vector accumulator of ``L`` lanes (8 with AVX2, 16 with AVX-512) over the row, zero-padded
  tail, then a halving tree over the lanes (:func:`inductor_row_sum`); a plain ``torch.sum``
  differs in the last bit;
* sigmoid inside a compiled gate is the vectorised (Sleef) sigmoid for every element;
  :func:`vector_sigmoid` makes eager ATen take its vector path everywhere (no scalar tail);
* softmax inside the compiled ``grouped`` gate uses Inductor's exp (Sleef) while eager
  ``torch.softmax`` uses MKL's; with ``exact=True`` (default) that one softmax is itself
  ``torch.compile``'d (a few seconds on first use per dtype), with ``exact=False`` it is eager
  (then weights may differ from SGLang's in the last bit, and near-ties may resolve differently).

For bf16 logits the compiled biased gate ranks on the float32 sigmoid (plus bias) but gathers its
weights from the bf16-rounded sigmoid; the eager ``plain`` gate with a bias ranks on the
bf16 scores; both are reproduced. On CUDA the same functions run, but the bitwise claim is only
for the CPU: SGLang's CUDA paths mostly use other kernels (Triton ``moe_fused_gate``, flashinfer),
see docs/routers.md.

Restriction to ``allowed`` ("as if only the experts in S existed"), per row that has at least one
expert disallowed (rows with every expert allowed are SGLang's routing, verbatim):

* usable experts: allowed and with a choice score above -inf;
* scores do not change: the affinity (unbiased score the weights come from) and the choice score
  (the biased score the gate ranks on) are those of the unrestricted gate, over all experts. For a
  softmax gate that is the model's own probability, not a softmax over S: renormalised gates give
  the same weights either way, non-renormalised ones keep the model's probabilities;
* group scores over usable experts only: ``grouped`` takes the max over the group's usable
  experts; ``biased_grouped`` (DeepSeek's sum of the two best biased scores) takes the sum of the
  group's best min(2, n) usable scores, so a group reduced to one expert scores that expert alone
  (which is what the gate computes if the group had only that expert; SGLang's own formula would
  add -inf). A group with no usable expert does not exist and is never selected, so a token uses
  at most ``topk_group`` groups, possibly fewer;
* experts: the best ``top_k`` usable experts of the selected groups by choice score, best first,
  exact ties to the lower index (the same order on every device and in the fused kernel); weights
  from the affinity, renormalised over the routed columns and scaled exactly as SGLang does.

A restricted row is *short* when its selected groups hold fewer than ``top_k`` usable experts; it
is then routed exactly like the unrestricted gate (SGLang's own routing of that row, which may use
disallowed experts; ``short`` reports those rows), rather than padded with -inf or disallowed
experts that would carry weight.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from xshare.selection.types import FLOAT_DTYPES, RENORMALIZE_EPS, check_router_logits

SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")
CUSTOM_ROUTERS = ("llama4",)
GATES = ("plain", "grouped", "biased_grouped", "llama4")


_FLOAT_DTYPES = FLOAT_DTYPES
# Eager ATen runs an elementwise op on one thread below this many elements (at::internal::GRAIN_SIZE
# is 32768; a chunk of exactly that size may still be split), and its vector loop handles
# 2 x Vectorized<float>::size() elements per step (<= 32 with AVX-512): chunks that are multiples of
# 64 never reach the scalar tail.
_VECTOR_CHUNK = 16384
_VECTOR_UNIT = 64
_LLAMA4_QUALNAME = "Llama4MoE.custom_routing_function"


# ----------------------------------------------------------------------------------------------
# RouterSpec
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Numerics of SGLang's compiled gates
# ----------------------------------------------------------------------------------------------


def inductor_lanes(device: torch.device) -> int | None:
    """float32 lanes of the vector accumulator Inductor's CPU code reduces with (8 AVX2, 16 AVX-512),
    or None where it is not emulated (other devices or ISAs)."""
    if device.type != "cpu":
        return None
    return _cpu_lanes()


@functools.cache
def _cpu_lanes() -> int | None:
    """The CPU's lanes for :func:`inductor_lanes` (asked once: the capability query is slow)."""
    return {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability())


def inductor_row_sum(w: Tensor) -> Tensor:
    """float32 [T, 1]: the sum of each row of ``w`` [T, k] in the order Inductor's CPU reduction adds.

    One vector accumulator of L lanes over the row (the tail chunk zero-padded), then a halving tree
    over the lanes (lane i + lane i + L/2, ...), as ``at::vec::vec_reduce_all`` does. Where that is
    not emulated (:func:`inductor_lanes` is None) this is ``torch.sum``.
    """
    w = w.to(torch.float32)
    lanes = inductor_lanes(w.device)
    if lanes is None or w.shape[-1] == 0:
        return w.sum(dim=-1, keepdim=True, dtype=torch.float32)
    pad = (-w.shape[-1]) % lanes
    if pad:
        w = F.pad(w, (0, pad))
    acc = w[:, :lanes]
    for start in range(lanes, w.shape[-1], lanes):
        acc = acc + w[:, start:start + lanes]
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = acc[:, :half] + acc[:, half:]
    return acc


def vector_sigmoid(x: Tensor) -> Tensor:
    """sigmoid of float32 ``x`` (any shape) through ATen's vectorised kernel for every element.

    Eager ATen computes the last few elements of a chunk with the scalar formula (glibc exp), which
    can differ in the last bit from the vector (Sleef) one Inductor uses everywhere; chunks of a
    multiple of 64 elements, each small enough for one thread, never reach that tail.
    """
    if x.device.type != "cpu":
        return torch.sigmoid(x)
    flat = x.reshape(-1)
    n = flat.numel()
    pad = (-n) % _VECTOR_UNIT
    if pad:
        flat = F.pad(flat, (0, pad))
    if flat.numel() <= _VECTOR_CHUNK:  # one chunk: one op
        return torch.sigmoid(flat)[:n].view(x.shape)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), _VECTOR_CHUNK):
        torch.sigmoid(flat[start:start + _VECTOR_CHUNK], out=out[start:start + _VECTOR_CHUNK])
    return out[:n].view(x.shape)


def _softmax_lastdim(x: Tensor) -> Tensor:
    return torch.softmax(x, dim=-1)


_compiled_softmax = None


def compiled_softmax(x: Tensor) -> Tensor:
    """``torch.softmax(x, -1)`` as a ``torch.compile``'d kernel computes it (Inductor's exp and
    reduction order): the softmax inside SGLang's compiled ``grouped_topk_gpu``. Compiled on first use."""
    global _compiled_softmax
    if _compiled_softmax is None:
        _compiled_softmax = torch.compile(_softmax_lastdim, dynamic=True)
    return _compiled_softmax(x)


def _eager_score(x: Tensor, scoring: str) -> Tensor:
    """The scoring of SGLang's eager fused_topk_torch_native, in x's dtype."""
    if scoring == "softmax":
        return x.softmax(dim=-1)
    if scoring == "sigmoid":
        return x.sigmoid()
    return F.softplus(x).sqrt()


def _compiled_score(x: Tensor, scoring: str, exact: bool) -> Tensor:
    """The scoring inside a compiled SGLang gate (float32 math, rounded once to x's dtype)."""
    if scoring == "softmax":
        if exact and x.device.type == "cpu":
            return compiled_softmax(x)
        return x.softmax(dim=-1)
    return vector_sigmoid(x.to(torch.float32)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------


class GateScores(NamedTuple):
    """What a batch objective works on, for one layer and batch.

    affinity   float32 [T, E]: the unbiased score the gate turns into weights (before renormalising and
               scaling), as SGLang holds it (bf16-rounded where SGLang gathers from bf16).
    choice     float32 [T, E]: the score the gate ranks experts on (affinity + correction bias; the raw
               logit for 'llama4').
    reachable  bool [T, E]: experts in the token's selected groups under the unrestricted gate
               (all True for ungrouped gates).
    """

    affinity: Tensor
    choice: Tensor
    reachable: Tensor
    native: object = None  # the gate's tensors in SGLang's dtypes (reused by reference_route(scores=))


class GateRouting(NamedTuple):
    """topk_ids int32 [T, W], topk_weights float32 [T, W] (W = top_k + shared slot; the shared column
    is last with id E), short bool [T] (restricted rows that could not be filled from allowed experts
    and were routed like the unrestricted gate)."""

    topk_ids: Tensor
    topk_weights: Tensor
    short: Tensor


@dataclass
class _Native:
    """A gate's tensors in the dtypes SGLang holds them."""

    affinity: Tensor  # what weights are gathered from
    choice: Tensor  # what experts are ranked on


_check_logits = check_router_logits


def _check_spec(spec: object) -> None:
    if not isinstance(spec, RouterSpec):
        raise ValueError(f"spec must be a RouterSpec, got {type(spec).__name__}")


def _native(logits: Tensor, spec: RouterSpec, exact: bool) -> _Native:
    gate = spec.gate
    bias = spec.correction_bias
    if bias is not None:
        bias = bias.to(logits.device)
    if gate == "plain":
        if bias is None:
            scores = _eager_score(logits.float(), spec.scoring)
            return _Native(scores, scores)
        scores = _eager_score(logits, spec.scoring)
        return _Native(scores, scores.view(-1, logits.shape[1]) + bias.unsqueeze(0))
    if gate == "grouped":
        scores = _compiled_score(logits, spec.scoring, exact)
        return _Native(scores, scores)
    if gate == "biased_grouped":
        s32 = vector_sigmoid(logits.to(torch.float32))
        choice_dtype = torch.promote_types(logits.dtype, bias.dtype)
        choice = (s32 + bias.to(torch.float32).unsqueeze(0)).to(choice_dtype)
        return _Native(s32.to(logits.dtype), choice)
    # llama4
    weight_dtype = spec.weight_dtype or logits.dtype
    return _Native(vector_sigmoid(logits.to(torch.float32)).to(weight_dtype), logits)


def _group_scores(choice: Tensor, usable: Tensor | None, gate: str, groups: int) -> Tensor:
    """[T, G] group scores in choice's dtype: SGLang's formula (usable None), or over usable experts."""
    num_rows, num_experts = choice.shape
    shape = (num_rows, groups, num_experts // groups)
    view = choice.view(shape)
    if usable is not None:  # a Python scalar fill: no host tensor copied to the device
        view = torch.where(usable.reshape(shape), view, float("-inf"))
    if gate == "grouped":
        return view.max(dim=-1).values
    top2 = view.topk(2, dim=-1).values.to(torch.float32)
    total = top2[..., 0] + top2[..., 1]
    if usable is not None:
        total = torch.where(top2[..., 1] > float("-inf"), total, top2[..., 0])
    return total.to(choice.dtype)


def _select_groups(group_scores: Tensor, keep: int, drop_empty: bool) -> Tensor:
    """bool [T, G]: the ``keep`` best groups (torch.topk, unsorted, like SGLang)."""
    idx = torch.topk(group_scores, k=keep, dim=-1, sorted=False)[1]
    mask = torch.zeros(group_scores.shape, dtype=torch.bool, device=group_scores.device)
    mask.scatter_(1, idx, True)
    if drop_empty:
        mask &= group_scores > float("-inf")
    return mask


def _expand_groups(group_mask: Tensor, num_experts: int) -> Tensor:
    num_rows, groups = group_mask.shape
    return group_mask.unsqueeze(-1).expand(num_rows, groups, num_experts // groups).reshape(num_rows, num_experts)


def _check_allowed(allowed: Tensor | None, num_rows: int, num_experts: int, device: torch.device) -> Tensor | None:
    if allowed is None:
        return None
    if not isinstance(allowed, Tensor) or allowed.dtype != torch.bool:
        raise ValueError("allowed must be a bool tensor [E] or [T, E]")
    if allowed.shape not in ((num_experts,), (num_rows, num_experts)):
        raise ValueError(f"allowed must have shape [E] = [{num_experts}] or [T, E] = [{num_rows}, {num_experts}], "
                         f"got {tuple(allowed.shape)}")
    if allowed.device != device:
        raise ValueError(f"allowed is on {allowed.device}, router_logits on {device}")
    return allowed.expand(num_rows, num_experts)


def router_scores(router_logits: Tensor, spec: RouterSpec, *, exact: bool = True) -> GateScores:
    """Affinity, choice score and reachable experts of the unrestricted gate (see :class:`GateScores`).

    router_logits float [T, E]; ``exact`` as in :func:`reference_route`. Raises ValueError naming the
    argument.
    """
    _check_logits(router_logits)
    _check_spec(spec)
    num_rows, num_experts = router_logits.shape
    if spec.correction_bias is not None and spec.correction_bias.numel() != num_experts:
        raise ValueError(f"correction_bias has {spec.correction_bias.numel()} entries, router_logits has "
                         f"E = {num_experts}")
    if spec.num_expert_group is not None and num_experts % spec.num_expert_group:
        raise ValueError(f"num_expert_group = {spec.num_expert_group} does not divide E = {num_experts}")
    native = _native(router_logits, spec, exact)
    if spec.num_expert_group is None:
        reachable = torch.ones(num_rows, num_experts, dtype=torch.bool, device=router_logits.device)
    else:
        group_scores = _group_scores(native.choice, None, spec.gate, spec.num_expert_group)
        reachable = _expand_groups(_select_groups(group_scores, spec.topk_group, False), num_experts)
    return GateScores(native.affinity.to(torch.float32), native.choice.to(torch.float32), reachable, native)


def reference_route(
    router_logits: Tensor,
    top_k: int,
    spec: RouterSpec,
    allowed: Tensor | None = None,
    *,
    exact: bool = True,
    scores: GateScores | None = None,
) -> GateRouting:
    """Route one MoE layer's batch as SGLang 0.5.23's torch gate for ``spec`` does, restricted to ``allowed``.

    router_logits  float [T, E] (fp32 or bf16 as the model produces them; SGLang's dtype semantics
                   follow the dtype).
    top_k          routed experts per token (the model's num_experts_per_tok; a shared slot is extra).
    spec           a :class:`RouterSpec`.
    allowed        bool [E] or [T, E]: the experts that exist for the batch (or for each token), or None
                   (all). Rows with every expert allowed are SGLang's routing bit for bit.
    exact          reproduce the softmax of SGLang's compiled grouped gate with a compiled softmax
                   (CPU; first use compiles for a few seconds); False: eager softmax.
    scores         :func:`router_scores` of the same logits, spec and ``exact``: its gate is reused
                   instead of computed again (the same result).

    Returns :class:`GateRouting`: topk_ids int32 [T, W] and topk_weights float32 [T, W], W = top_k +
    spec.num_fused_shared_experts (shared column last, id E), and short bool [T]. The module
    docstring defines the restriction and the short rows. Raises ValueError naming the argument.
    """
    _check_logits(router_logits)
    _check_spec(spec)
    num_rows, num_experts = router_logits.shape
    spec.check(num_experts, top_k)
    device = router_logits.device
    allowed = _check_allowed(allowed, num_rows, num_experts, device)
    gate = spec.gate
    shared = spec.num_fused_shared_experts
    width = top_k + shared
    reuse = isinstance(scores, GateScores) and isinstance(scores.native, _Native)
    native = scores.native if reuse else _native(router_logits, spec, exact)
    choice = native.choice
    neg = float("-inf")  # fills are Python scalars: torch.where keeps choice's dtype, copies nothing

    # SGLang's own key (what its final torch.topk ranks).
    if spec.num_expert_group is None:
        key = choice
    else:
        if reuse:
            reachable = scores.reachable
        else:
            group_u = _select_groups(_group_scores(choice, None, gate, spec.num_expert_group), spec.topk_group, False)
            reachable = _expand_groups(group_u, num_experts)
        fill = 0.0 if gate == "grouped" else neg
        key = torch.where(reachable, choice, fill)

    short = torch.zeros(num_rows, dtype=torch.bool, device=device)
    if allowed is not None:
        restricted = ~allowed.all(dim=-1)
        usable = allowed & (choice > float("-inf"))
        if spec.num_expert_group is None:
            candidate = usable
        else:
            group_r = _select_groups(_group_scores(choice, usable, gate, spec.num_expert_group), spec.topk_group, True)
            candidate = usable & _expand_groups(group_r, num_experts)
        short = restricted & (candidate.sum(dim=-1) < top_k)
        use_r = (restricted & ~short).unsqueeze(-1)
        key = torch.where(use_r, torch.where(candidate, choice, neg), key)

    if gate == "llama4":
        ids = torch.max(key, dim=-1, keepdim=True)[1] if width == 1 else torch.topk(key, width, dim=-1)[1]
    else:
        sort = gate == "plain" and spec.correction_bias is None or shared > 0
        ids = torch.topk(key, k=width, dim=-1, sorted=sort)[1]
    if allowed is not None:
        # Rows the set restricts: their best experts by choice score, best first, exact ties to the lower
        # index (torch.topk's order among ties is implementation-defined; the fused kernel's is this one).
        ordered = torch.sort(key, dim=-1, descending=True, stable=True)[1][:, :width]
        ids = torch.where(use_r, ordered, ids)
    weights = native.affinity.gather(1, ids)
    if shared:
        ids[:, -1] = num_experts
    weights = _finish_weights(weights, spec, gate, top_k)
    if shared and spec.fused_shared_experts_scaling_factor is not None:
        weights[:, -1] *= spec.fused_shared_experts_scaling_factor
    return GateRouting(ids.to(torch.int32), weights, short)


@functools.lru_cache(maxsize=64)
def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (a host constant: computed once, never from device data)."""
    return torch.tensor(value, dtype=dtype).item()


def _finish_weights(w: Tensor, spec: RouterSpec, gate: str, top_k: int) -> Tensor:
    """Renormalise and scale the gathered weights [T, W] exactly as the SGLang gate does (float32 out)."""
    rsf = spec.routed_scaling_factor
    if gate in ("plain", "llama4"):
        # fused_topk_torch_native / the custom function, then select_experts' eager, in-place fold of
        # the factor (in the weights' dtype: bf16 weights stay bf16-rounded).
        if spec.renormalize:
            w = w / (w.sum(dim=-1, keepdim=True, dtype=torch.float32) + RENORMALIZE_EPS)
        if spec.scaling_in_weights:
            w = w * rsf
        return w.to(torch.float32)
    shared = spec.num_fused_shared_experts
    if gate == "grouped":
        # grouped_topk_gpu: the shared column is set before renormalising, to (routed sum if
        # renormalising else 1) / factor. Compiled, the sum is rounded to the scores' dtype (it is
        # materialised) but the division, the column write and the renormalisation are fused, so that
        # quotient stays float32; without renormalisation the constant is stored in the scores' dtype
        # (both matched on bf16 logits).
        if shared and rsf is not None:
            w = w.clone()
            if spec.renormalize:
                total = inductor_row_sum(w[:, :top_k]).to(w.dtype).to(torch.float32)
                w = w.to(torch.float32)
                w[:, -1] = (total / rsf).squeeze(-1)
            else:
                w[:, -1] = 1.0 / rsf
        if spec.renormalize:
            w = w / (inductor_row_sum(w[:, :top_k]) + RENORMALIZE_EPS)
        if spec.scaling_in_weights:
            w = w.to(torch.float32) * rsf  # compiled: the product is not rounded to bf16
        return w.to(torch.float32)
    # biased_grouped_topk_impl: the shared column is overwritten after renormalising and scaling,
    # with a constant stored in the weights' dtype (bf16 when bf16 weights are not renormalised).
    weights_dtype = torch.float32 if spec.renormalize else w.dtype
    if spec.renormalize:
        w = w / (inductor_row_sum(w[:, :top_k]) + RENORMALIZE_EPS)
    w = w.to(torch.float32)
    if spec.scaling_in_weights:
        w = w * rsf  # compiled: a bf16 weight times the factor is not rounded to bf16 (matched)
    if shared:
        value = 1.0 if spec.scaling_in_weights or not rsf else 1.0 / rsf
        w = w.clone()
        w[:, -1] = _rounded(value, weights_dtype)
    return w
