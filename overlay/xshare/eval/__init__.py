"""Offline trace replay and what-if evaluation of the selection policies (``xshare eval``).

    traces     load and validate routing traces (.npz), mix several into one replay
    batching   decode-like batches (B tokens from B different sequences) or the recorded ones
    eplb       DeepSeek's EPLB: balanced packing, hot-expert replication, hierarchical/global
    replay     run :func:`xshare.selection.select` per layer and batch, compute the metrics
    summary    the result row of each setting: averages over layers and batches (the JSON schema)
    costmodel  a roofline model of MoE decode time on GPUs we do not have
    report     the JSON document, markdown tables, equal-activation comparison
    plots      matplotlib figures (activation vs batch, trade-off, per-GPU load)

Everything here needs numpy and torch; plots also need matplotlib (the ``eval`` extra).
"""

from xshare.eval.traces import Trace, TraceError, load_trace, load_traces, mix_traces

__all__ = ["Trace", "TraceError", "load_trace", "load_traces", "mix_traces"]
