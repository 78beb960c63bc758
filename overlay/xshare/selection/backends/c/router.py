"""The C backend for router-spec layers (biased and grouped gates: DeepSeek-V3/R1, GLM-4.5, Kimi-K2,
DeepSeek-V2, Llama-4, ``sqrtsoftplus``, biased plain gates): the decision of
:func:`~xshare.selection.backends.reference_router.decide_router` in one C call (``_cpu_router.c``, built
into the library of :mod:`xshare.selection.backends.c.kernel`).

Torch computes what must stay bitwise SGLang's: the gate once
(:func:`~xshare.selection.routers.gate.router_scores`, as the torch path does), the batch's column sums,
and the weights of the routed ids (gathered from the gate's affinities and finished by the gate's own
:func:`~xshare.selection.routers.gate.finish_weights`). C does the rest: the warm-up, the set, which rows
the set restricts, each restricted row's group re-selection and top_k inside S, short rows, and the
bookkeeping the adapter records. Its top-k orders ties as ``torch.topk`` does on the CPU, so ids, their
column order and the weights equal the torch path's (``tests/selection/test_cpu_router.py``).

Policies: ``xshare`` (without a mass target) and ``topk`` entirely in C; the other set policies
(``lynx``, ``des_vote``, ``oea``) pick their set in torch on
:func:`~xshare.selection.backends.reference_router.router_batch` and C routes inside it. Gates whose
choice scores are float32 or bf16 (every family on fp32 / bf16 logits with a float32 or bf16 bias).

    decision, scores = decide_router_c(call, layer_config(config, call.layer))
    decision.routing, decision.replaced, decision.short_rows   # None: the torch reference routes it
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from xshare.selection.backends.c.kernel import (
    CpuRouting,
    c_decides,
    contiguous_int32,
    kernel_error,
    library,
    ptr,
    routable_set_policy,
)
from xshare.selection.backends.reference_router import router_batch
from xshare.selection.call import Decision, LayerCall
from xshare.selection.checks import check_exact, check_inputs
from xshare.selection.common import SUM_SCALE, fixed_point_totals
from xshare.selection.config import SelectorConfig
from xshare.selection.registry import get_policy
from xshare.selection.routers.gate import GateScores, NativeScores, finish_weights, router_scores
from xshare.selection.routers.numerics import compiled_score, inductor_lanes, vector_sigmoid
from xshare.selection.routers.spec import RouterSpec
from xshare.selection.types import RENORMALIZE_EPS, Routing

_GATES = {"plain": 0, "grouped": 1, "biased_grouped": 2, "llama4": 3}
_CHOICE_DTYPES = (torch.float32, torch.bfloat16)  # exact in float32; the biased group score rounds to bf16 in C


@dataclass
class CpuRouterRouting(CpuRouting):
    """:class:`~xshare.selection.backends.c.kernel.CpuRouting` of a router-spec layer (``scores``: the gate
    probabilities the adapter's figures read), plus what ``Decision`` carries for such layers."""

    replaced: Tensor  # bool [T]: rows routed inside the set (every other row keeps the engine's routing)
    short_rows: Tensor  # int64 0-d: valid rows left to the engine (short inside their groups, or no expert of S)
    # cpu_router_served only: SGLang's outputs with the replaced rows' routed columns rewritten
    # (ids int32, weights float32 [T, W], SGLang's layout), and |active|, |vanilla active| as host ints
    outputs: tuple[Tensor, Tensor] | None = None
    counts: tuple[int, int] | None = None

    def active_counts(self) -> tuple[int, int]:
        return self.counts if self.counts is not None else super().active_counts()


def cpu_router_supports(call: LayerCall, config: SelectorConfig, scores: GateScores) -> bool:
    """Whether :func:`cpu_router_route` implements this router-spec call: CPU tensors, no DeepEP
    global mode, a policy the C code decides (``xshare`` without a mass target,
    ``topk``) or another set policy, choice scores in float32 or bf16, and the engine's picks (if
    given) at least top_k wide."""
    spec, logits = call.layer, call.router_logits
    if not isinstance(spec, RouterSpec) or call.all_reduce is not None:
        return False
    if logits.device.type != "cpu" or logits.ndim != 2 or config.target_mass is not None:
        return False
    policy = get_policy(config.policy)
    if not (c_decides(policy, config) or routable_set_policy(config.policy) is not None):
        return False
    if policy.uses_groups() and call.groups is not None:
        return False
    if not isinstance(scores.native, NativeScores) or scores.native.choice.dtype not in _CHOICE_DTYPES:
        return False
    ids = call.engine_ids
    return ids is None or (isinstance(ids, Tensor) and ids.ndim == 2 and ids.shape[0] == logits.shape[0]
                           and ids.shape[1] >= call.top_k and not ids.dtype.is_floating_point)


def _figure_probs(logits: Tensor, scores: GateScores, spec: RouterSpec, config: SelectorConfig) -> Tensor:
    """float32 [T, E]: the probabilities the adapter's figures use (softmax / sigmoid of the logits as
    ``config.scoring`` says); the gate's own affinities when they are those already."""
    if scores.native.affinity.dtype == torch.float32 and spec.scoring == config.scoring \
            and logits.dtype == torch.float32:
        return scores.affinity.contiguous()
    lg = logits.float()
    return (torch.softmax(lg, dim=-1) if config.scoring == "softmax" else torch.sigmoid(lg)).contiguous()


def _checked_rows(call: LayerCall, config: SelectorConfig) -> tuple[Tensor | None, int, bool]:
    """What both C router paths check first (the spec against E and top_k, the call's arguments) and the
    row facts they hand to C: the exact rows bool [T] (contiguous, or None), the number of valid rows, and
    whether the policy applies (the config's batch-size range, not a vanilla policy)."""
    num_rows, num_experts = call.router_logits.shape
    call.layer.check(num_experts, call.top_k)
    check_inputs(call, config)
    exact = check_exact(call.exact, num_rows, call.router_logits.device)
    exact = None if exact is None else exact.contiguous()  # held: C reads its memory
    n_valid = num_rows if call.num_tokens is None else max(0, min(num_rows, int(call.num_tokens)))
    return exact, n_valid, config.applies_to(n_valid) and not get_policy(config.policy).vanilla


def cpu_router_route(call: LayerCall, config: SelectorConfig, scores: GateScores) -> CpuRouterRouting:
    """The routing :func:`~xshare.selection.backends.reference_router.decide_router` gives ``call`` (same ids,
    column order and weights, replaced and short rows), for a call :func:`cpu_router_supports` accepts. ``config``
    has the layer's scoring applied (:func:`xshare.selection.call.layer_config`); ``scores`` is
    :func:`~xshare.selection.routers.gate.router_scores` of the call's logits and spec. The numbers are the
    config's (host values: the CPU runs no graphs). Raises ValueError for a call the core cannot route,
    RuntimeError if the kernel is unavailable or fails."""
    spec = call.layer
    logits = call.router_logits
    num_rows, num_experts = logits.shape
    top_k = call.top_k
    exact, n_valid, apply = _checked_rows(call, config)
    lib = library()
    policy = get_policy(config.policy)
    choice = scores.choice.contiguous()
    grouped = spec.num_expert_group is not None
    reachable = scores.reachable.contiguous() if grouped else None
    given_set = colsum = None
    if apply and not c_decides(policy, config):
        given_set = policy.batch_set(router_batch(call, config, scores)).contiguous()
    elif apply:
        masked = torch.empty(num_rows, num_experts, dtype=torch.float32)
        affinity = scores.affinity.contiguous()
        lib.xshare_cpu_router_scores(num_rows, num_experts, choice.data_ptr(), ptr(reachable), affinity.data_ptr(),
                                     n_valid, masked.data_ptr())
        colsum = fixed_point_totals(masked).to(torch.float64)  # the torch path's sums, in fixed-point units
    pref = contiguous_int32(call.engine_ids)
    shared = spec.num_fused_shared_experts
    width = top_k + shared
    gate = spec.gate
    sort = gate == "plain" and spec.correction_bias is None or shared > 0 or gate == "llama4"
    unreached = 0.0 if gate == "grouped" else float("-inf")
    route = torch.empty(num_rows, width, dtype=torch.int64)
    ids = torch.empty(num_rows, top_k, dtype=torch.int32)
    replaced = torch.empty(num_rows, dtype=torch.bool)
    flags = torch.empty(3, num_experts, dtype=torch.bool)  # S, active, vanilla active
    counts = torch.empty(3, dtype=torch.int64)  # changed rows, checksum, short rows
    base = flags.data_ptr()
    rc = lib.xshare_cpu_router(num_rows, num_experts, top_k, width, 0 if pref is None else pref.shape[1],
                               choice.data_ptr(), ptr(reachable), ptr(colsum), ptr(pref), n_valid, int(apply),
                               config.budget_for(num_experts), config.warmup_k, ptr(given_set),
                               ptr(exact), _GATES[gate],
                               spec.num_expert_group or 0, spec.topk_group or 0, unreached,
                               int(scores.native.choice.dtype == torch.bfloat16), int(sort), route.data_ptr(),
                               ids.data_ptr(), replaced.data_ptr(), base, base + num_experts,
                               base + 2 * num_experts, counts.data_ptr())
    if rc != 0:
        raise RuntimeError(kernel_error(rc))
    # the weights as the torch path computes them: gathered from the gate's affinities, finished by the gate
    weights = finish_weights(scores.native.affinity.gather(1, route), spec, gate, top_k)[:, :top_k]
    in_set, active, vanilla_active = flags.unbind(0)
    changed, checksum, _ = counts.tolist()
    return CpuRouterRouting(
        routing=Routing(topk_ids=ids, topk_weights=weights, active=active, physical_ids=None),
        scores=_figure_probs(logits, scores, spec, config), logits=logits.float().contiguous(), engine_ids=pref,
        in_set=in_set, vanilla_active=vanilla_active, changed_tokens=changed, checksum=checksum,
        num_valid=n_valid, replaced=replaced, short_rows=counts[2])


def served_supports(call: LayerCall, config: SelectorConfig) -> bool:
    """Whether :func:`cpu_router_served` implements this call: a grouped or biased-grouped gate (DeepSeek-V3/R1,
    GLM-4.5, Kimi-K2, DeepSeek-V2) on float32 or bf16 CPU logits, a float32 or bf16 choice dtype, where the
    weights' renormalising sum is emulated (:func:`~xshare.selection.routers.numerics.inductor_lanes`), ``xshare``
    (without a mass target) or ``topk``, no request groups, no DeepEP global mode, and SGLang's outputs
    (``call.engine_outputs``: int32 ids and float32 weights, contiguous, routed columns first) to write the
    replacement in, or none with ``call.engine_gate`` (the call computes SGLang's gate itself; no fused
    shared slot, whose id SGLang draws at random)."""
    spec, logits = call.layer, call.router_logits
    if not isinstance(spec, RouterSpec) or spec.gate not in ("grouped", "biased_grouped"):
        return False
    if call.all_reduce is not None or config.target_mass is not None:
        return False
    if call.engine_gate:  # this call is SGLang's gate: its torch gates without a fused shared slot
        if call.engine_outputs is not None or call.engine_ids is not None or spec.num_fused_shared_experts:
            return False
    elif call.engine_outputs is None:
        return False
    if logits.device.type != "cpu" or logits.ndim != 2 or logits.dtype not in _CHOICE_DTYPES:
        return False
    bias = spec.correction_bias
    if bias is not None and torch.promote_types(logits.dtype, bias.dtype) not in _CHOICE_DTYPES:
        return False
    if inductor_lanes(logits.device) is None or not c_decides(get_policy(config.policy), config):
        return False
    if get_policy(config.policy).uses_groups() and call.groups is not None:
        return False
    if call.engine_gate:
        return True
    ids, weights = call.engine_outputs
    engine = call.engine_ids
    return (ids.dtype == torch.int32 and weights.dtype == torch.float32 and ids.device.type == "cpu"
            and ids.ndim == 2 and ids.shape == weights.shape and ids.shape[0] == logits.shape[0]
            and ids.shape[1] >= call.top_k and ids.is_contiguous() and weights.is_contiguous()
            and isinstance(engine, Tensor) and engine.ndim == 2 and engine.shape[1] >= call.top_k
            and not engine.dtype.is_floating_point)


def cpu_router_served(call: LayerCall, config: SelectorConfig) -> CpuRouterRouting:
    """:func:`cpu_router_route` for a call :func:`served_supports` accepts, with the gate's remaining steps
    (bias, groups, dtype rounding), the column sums, the weights and the replacement outputs in the same
    C call (torch computes only the scores: the sigmoid or softmax, bitwise SGLang's). ``outputs`` are
    what :meth:`xshare.sglang.topk_call.TopkCall.replace_rows` builds from ``routing`` and ``replaced``, and
    ``routing.topk_weights`` is their routed columns. Raises as :func:`cpu_router_route`."""
    spec = call.layer
    logits = call.router_logits
    num_rows, num_experts = logits.shape
    top_k = call.top_k
    exact, n_valid, apply = _checked_rows(call, config)
    biased = spec.gate == "biased_grouped"
    if biased:  # biased_grouped_topk: float32 sigmoid, the affinity rounded to the logits' dtype
        score = vector_sigmoid(logits.to(torch.float32))
        bias = spec.correction_bias.to(device=logits.device, dtype=torch.float32).contiguous()
        choice_bf16 = torch.promote_types(logits.dtype, spec.correction_bias.dtype) == torch.bfloat16
    else:  # grouped_topk: the compiled scores, already in the logits' dtype
        score = compiled_score(logits, spec.scoring, True).to(torch.float32)
        bias, choice_bf16 = None, False
    score = score.contiguous()
    if call.engine_gate:  # SGLang's gate is this call: its picks are computed here (engine_out)
        pref = torch.empty(num_rows, top_k, dtype=torch.int32)
        src_ids = src_w = None
        dst_ids, dst_w = torch.empty(num_rows, top_k, dtype=torch.int32), torch.empty(num_rows, top_k)
    else:
        pref = contiguous_int32(call.engine_ids)
        src_ids, src_w = call.engine_outputs
        dst_ids, dst_w = torch.empty_like(src_ids), torch.empty_like(src_w)
    affinity = torch.empty(num_rows, num_experts, dtype=torch.float32)
    ids = torch.empty(num_rows, top_k, dtype=torch.int32)
    replaced = torch.empty(num_rows, dtype=torch.bool)
    flags = torch.empty(3, num_experts, dtype=torch.bool)  # S, active, vanilla active
    counts = torch.empty(5, dtype=torch.int64)  # changed rows, checksum, short rows, |active|, |vanilla active|
    scale = spec.routed_scaling_factor if spec.scaling_in_weights else 0.0
    rc = library().xshare_cpu_router_served(
        num_rows, num_experts, top_k, dst_ids.shape[1], pref.shape[1], score.data_ptr(), ptr(bias),
        int(logits.dtype == torch.bfloat16), int(choice_bf16), _GATES[spec.gate], spec.num_expert_group or 0,
        spec.topk_group or 0, pref.data_ptr(), n_valid, int(apply), config.budget_for(num_experts), config.warmup_k,
        ptr(exact), ptr(src_ids), ptr(src_w), int(spec.renormalize), RENORMALIZE_EPS,
        inductor_lanes(logits.device), scale, float(SUM_SCALE), affinity.data_ptr(), ids.data_ptr(),
        replaced.data_ptr(), flags.data_ptr(), counts.data_ptr(), dst_ids.data_ptr(), dst_w.data_ptr(),
        0, ptr(pref if call.engine_gate else None))  # SGLang's gate sorts only with a fused shared slot
    if rc != 0:
        raise RuntimeError(kernel_error(rc))
    in_set, active, vanilla_active = flags.unbind(0)
    changed, checksum, _, n_active, n_vanilla = counts.tolist()
    if logits.dtype == torch.float32 and spec.scoring == config.scoring:
        probs = affinity  # the figures' probabilities are the gate's own affinities
    else:
        lg = logits.float()
        probs = (torch.softmax(lg, dim=-1) if config.scoring == "softmax" else torch.sigmoid(lg)).contiguous()
    return CpuRouterRouting(
        routing=Routing(topk_ids=ids, topk_weights=dst_w[:, :top_k], active=active, physical_ids=None),
        scores=probs, logits=logits.float().contiguous(), engine_ids=pref, in_set=in_set, vanilla_active=vanilla_active,
        changed_tokens=changed, checksum=checksum, num_valid=n_valid, replaced=replaced, short_rows=counts[2],
        outputs=(dst_ids, dst_w), counts=(n_active, n_vanilla))




def decide_served(call: LayerCall, config: SelectorConfig, checkpoint: Callable[[], None] | None = None) -> Decision:
    """The served path's decision (:func:`cpu_router_served`) of a call :func:`served_supports` accepts."""
    if checkpoint is not None:
        checkpoint()
    res = cpu_router_served(call, config)
    return Decision(res.routing, config, cpu=res, replaced=res.replaced, short_rows=res.short_rows, outputs=res.outputs)


def decide_router_c(call: LayerCall, config: SelectorConfig,
                    checkpoint: Callable[[], None] | None = None) -> tuple[Decision | None, GateScores | None]:
    """The C kernel's decision for a router-spec call (``config`` with the layer's scoring applied), or
    (None, the gate's scores) when neither C path implements it: the torch reference then reuses those
    scores. :func:`cpu_router_served` first (the gate's rest, the decision and the outputs in one C
    call), else :func:`cpu_router_route` on the gate's scores computed once here."""
    if served_supports(call, config):
        return decide_served(call, config, checkpoint), None
    scores = router_scores(call.router_logits, call.layer, exact=call.router_logits.device.type == "cpu")
    if not cpu_router_supports(call, config, scores):
        return None, scores
    if checkpoint is not None:
        checkpoint()
    res = cpu_router_route(call, config, scores)
    return Decision(res.routing, config, cpu=res, replaced=res.replaced, short_rows=res.short_rows), None
