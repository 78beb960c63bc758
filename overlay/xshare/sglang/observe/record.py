"""The bookkeeping of one applied MoE layer call: the layer sums and, while the metrics are observed,
the call's window row, added on the device (CUDA-graph safe) or from the C kernel's host numbers.

Input: the process state (its counters and placement cache), the call as read from SGLang
(:class:`~xshare.sglang.topk_call.TopkCall`), the core's :class:`~xshare.selection.decide.Decision`.
"""

from __future__ import annotations

from xshare.selection import Placement
from xshare.selection.decide import Decision
from xshare.sglang.observe.figures import cpu_call_figures
from xshare.sglang.state import ProcessState
from xshare.sglang.topk_call import TopkCall


def record_call(proc: ProcessState, call: TopkCall, decision: Decision, placement: Placement | None) -> None:
    """The bookkeeping of one applied call, added on the device into preallocated accumulators
    (:meth:`~xshare.sglang.observe.stats.SelectorStats.record_call`: one Triton launch on CUDA, a short torch
    sequence elsewhere; no host read, CUDA-graph safe): the layer sums and, while the metrics are
    observed, the call's window row. The C kernel's calls add their host numbers into the same
    buffers. The host reads them at the flushes, after the forward (xshare.sglang.observe.stats)."""
    stats = proc.stats
    routing = decision.routing
    layer_id = call.layer_id
    mp = None  # the placement of the per-GPU figures, while observed
    if proc.observe:
        mp = placement if placement is not None else \
            proc.placements.for_layer(layer_id, call.num_experts, call.router_logits.device)
    res = decision.cpu
    if res is not None:
        figures = None if mp is None else \
            (lambda row: cpu_call_figures(res, layer_id, mp.primary_gpu, mp.num_gpus, row=row))
        active, vanilla = res.active_counts()
        stats.record_call_host(layer_id, active, vanilla, res.num_valid,
                               res.changed_tokens, res.checksum, figures=figures,
                               num_gpus=1 if mp is None else mp.num_gpus,
                               cap_bound=0 if routing.cap_bound is None else int(routing.cap_bound))
        return
    stats.record_call(layer_id, logits=call.router_logits, engine_ids=call.engine_ids, chosen_ids=routing.topk_ids,
                      active=routing.active, num_tokens=call.num_token_non_padded, placement=mp,
                      scoring=decision.config.scoring, cap_bound=routing.cap_bound)
