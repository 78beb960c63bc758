"""SGLang 0.5.23's own torch routing for a :class:`~xshare.selection.routers.spec.RouterSpec`, restricted
to a set of experts: :func:`reference_route` (router_logits float [T, E] in, ids int32 / weights float32
[T, top_k + shared slot] out) and :func:`router_scores` (the per-expert quantities a batch objective works
on: affinity, choice score, reachable experts, each [T, E]). Pure torch, no SGLang import.

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

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from xshare.selection.routers.numerics import compiled_score, eager_score, inductor_row_sum, rounded, vector_sigmoid
from xshare.selection.routers.spec import RouterSpec
from xshare.selection.types import RENORMALIZE_EPS, check_router_logits


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
class NativeScores:
    """A gate's tensors in the dtypes SGLang holds them."""

    affinity: Tensor  # what weights are gathered from
    choice: Tensor  # what experts are ranked on


def _check_spec(spec: object) -> None:
    if not isinstance(spec, RouterSpec):
        raise ValueError(f"spec must be a RouterSpec, got {type(spec).__name__}")


def _native_scores(logits: Tensor, spec: RouterSpec, exact: bool) -> NativeScores:
    gate = spec.gate
    bias = spec.correction_bias
    if bias is not None:
        bias = bias.to(logits.device)
    if gate == "plain":
        if bias is None:
            scores = eager_score(logits.float(), spec.scoring)
            return NativeScores(scores, scores)
        scores = eager_score(logits, spec.scoring)
        return NativeScores(scores, scores.view(-1, logits.shape[1]) + bias.unsqueeze(0))
    if gate == "grouped":
        scores = compiled_score(logits, spec.scoring, exact)
        return NativeScores(scores, scores)
    if gate == "biased_grouped":
        s32 = vector_sigmoid(logits.to(torch.float32))
        choice_dtype = torch.promote_types(logits.dtype, bias.dtype)
        choice = (s32 + bias.to(torch.float32).unsqueeze(0)).to(choice_dtype)
        return NativeScores(s32.to(logits.dtype), choice)
    # llama4
    weight_dtype = spec.weight_dtype or logits.dtype
    return NativeScores(vector_sigmoid(logits.to(torch.float32)).to(weight_dtype), logits)


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
    check_router_logits(router_logits)
    _check_spec(spec)
    num_rows, num_experts = router_logits.shape
    if spec.correction_bias is not None and spec.correction_bias.numel() != num_experts:
        raise ValueError(f"correction_bias has {spec.correction_bias.numel()} entries, router_logits has "
                         f"E = {num_experts}")
    if spec.num_expert_group is not None and num_experts % spec.num_expert_group:
        raise ValueError(f"num_expert_group = {spec.num_expert_group} does not divide E = {num_experts}")
    native = _native_scores(router_logits, spec, exact)
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
    check_router_logits(router_logits)
    _check_spec(spec)
    num_rows, num_experts = router_logits.shape
    spec.check(num_experts, top_k)
    allowed = _check_allowed(allowed, num_rows, num_experts, router_logits.device)
    shared = spec.num_fused_shared_experts
    width = top_k + shared
    reuse = isinstance(scores, GateScores) and isinstance(scores.native, NativeScores)
    native = scores.native if reuse else _native_scores(router_logits, spec, exact)
    key = _engine_key(native.choice, spec, scores.reachable if reuse else None)
    short = torch.zeros(num_rows, dtype=torch.bool, device=router_logits.device)
    use_r = None
    if allowed is not None:
        key, short, use_r = _restrict_key(key, native.choice, allowed, spec, top_k)

    gate = spec.gate
    if gate == "llama4":
        ids = torch.max(key, dim=-1, keepdim=True)[1] if width == 1 else torch.topk(key, width, dim=-1)[1]
    else:
        sort = gate == "plain" and spec.correction_bias is None or shared > 0
        ids = torch.topk(key, k=width, dim=-1, sorted=sort)[1]
    if use_r is not None:
        # Rows the set restricts: their best experts by choice score, best first, exact ties to the lower
        # index (torch.topk's order among ties is implementation-defined; the fused kernel's is this one).
        ordered = torch.sort(key, dim=-1, descending=True, stable=True)[1][:, :width]
        ids = torch.where(use_r, ordered, ids)
    weights = native.affinity.gather(1, ids)
    if shared:
        ids[:, -1] = num_experts
    weights = finish_weights(weights, spec, gate, top_k)
    if shared and spec.fused_shared_experts_scaling_factor is not None:
        weights[:, -1] *= spec.fused_shared_experts_scaling_factor
    return GateRouting(ids.to(torch.int32), weights, short)


def _engine_key(choice: Tensor, spec: RouterSpec, reachable: Tensor | None) -> Tensor:
    """[T, E] in choice's dtype: SGLang's own key, what its final torch.topk ranks (the choice score,
    outside the token's selected groups 0 for ``grouped`` and -inf for ``biased_grouped``).
    ``reachable``: the groups already selected (:func:`router_scores`), or None to select them here."""
    if spec.num_expert_group is None:
        return choice
    if reachable is None:
        group_u = _select_groups(_group_scores(choice, None, spec.gate, spec.num_expert_group), spec.topk_group, False)
        reachable = _expand_groups(group_u, choice.shape[1])
    fill = 0.0 if spec.gate == "grouped" else float("-inf")  # Python scalars: torch.where keeps the dtype
    return torch.where(reachable, choice, fill)


def _restrict_key(key: Tensor, choice: Tensor, allowed: Tensor, spec: RouterSpec,
                  top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The key of rows ``allowed`` [T, E] restricts (module doc): -inf outside their usable experts of the
    groups reselected over usable experts. Returns (key [T, E], short bool [T], use_r bool [T, 1]: the
    restricted rows that are not short, whose key is the restricted one)."""
    restricted = ~allowed.all(dim=-1)
    usable = allowed & (choice > float("-inf"))
    if spec.num_expert_group is None:
        candidate = usable
    else:
        group_r = _select_groups(_group_scores(choice, usable, spec.gate, spec.num_expert_group), spec.topk_group, True)
        candidate = usable & _expand_groups(group_r, choice.shape[1])
    short = restricted & (candidate.sum(dim=-1) < top_k)
    use_r = (restricted & ~short).unsqueeze(-1)
    return torch.where(use_r, torch.where(candidate, choice, float("-inf")), key), short, use_r


def finish_weights(w: Tensor, spec: RouterSpec, gate: str, top_k: int) -> Tensor:
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
        w[:, -1] = rounded(value, weights_dtype)
    return w
