"""Offline evaluation of the tiny model: exact match per task of greedy decoding, with the model's own
routing or with a selector over each batch's live rows (decode steps only unless ``select_prefill``:
what the SGLang plugin does by default), activated experts per layer and task specialisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from xshare.models import tasks as T
from xshare.models.decode import greedy_decode
from xshare.models.routing_override import RoutingOverride


def evaluate(model: torch.nn.Module, tokenizer: Any, problems: Sequence[T.Problem], *, selector: Any = None,
             batch_size: int = 16, select_prefill: bool = False, return_texts: bool = False) -> dict[str, Any]:
    """Exact match per task and overall of greedy decoding in batches of ``batch_size``.

    ``selector`` (a :class:`xshare.selection.SelectorConfig` or None for the model's own top-k)
    replaces the routing of every MoE layer over each batch's live rows (decode steps only unless
    ``select_prefill``). Also returns activated experts per layer on decode steps (and what top-k
    activates on the same rows), per-task expert usage, and decode tokens/s of this process.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    task_index = {t: i for i, t in enumerate(T.TASKS)}
    texts: list[str] = []
    timings: dict[str, float] = {}
    with RoutingOverride(model, selector, select_prefill=select_prefill) as ov:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            row_task = torch.tensor([task_index[p.task] for p in chunk], dtype=torch.long)
            gen = greedy_decode(model, tokenizer, [p.prompt for p in chunk], max_new_tokens=T.MAX_ANSWER_CHARS + 1,
                                override=ov, row_task=row_task, timings=timings)
            texts.extend(tokenizer.decode(g, skip_special_tokens=False) for g in gen)
    res: dict[str, Any] = {
        "problems": len(problems),
        "batch_size": batch_size,
        "selector": None if selector is None else selector.to_dict(),
        "accuracy": T.accuracy(problems, texts),
        "decode": ov.summary("decode"),
        "prefill": ov.summary("prefill"),
        "decode_tokens": int(timings.get("decode_tokens", 0)),
        "decode_seconds": round(timings.get("decode_s", 0.0), 4),
        "usage_decode": ov.usage["decode"].tolist(),
    }
    ds = timings.get("decode_s", 0.0)
    res["decode_tokens_per_s"] = res["decode_tokens"] / ds if ds > 0 else None
    if return_texts:
        res["texts"] = texts
    return res


def task_specialisation(usage: Sequence[Sequence[Sequence[int]]], tasks: Sequence[str] = T.TASKS) -> dict[str, Any]:
    """From per-layer [task, expert] counts: each task's share of routed slots per expert, the
    mean total-variation distance between tasks' expert distributions, and each task's top experts."""
    u = torch.tensor(usage, dtype=torch.float64)
    per_layer = []
    for layer in u:
        dist = layer / layer.sum(-1, keepdim=True).clamp(min=1)
        present = [i for i in range(len(tasks)) if layer[i].sum() > 0]
        tv = [0.5 * float((dist[a] - dist[b]).abs().sum()) for ai, a in enumerate(present) for b in present[ai + 1:]]
        per_layer.append({
            "mean_tv_distance": sum(tv) / len(tv) if tv else 0.0,
            "top_experts": {tasks[i]: torch.argsort(dist[i], descending=True)[:4].tolist() for i in present},
            "experts_for_90pct": {tasks[i]: int((torch.cumsum(torch.sort(dist[i], descending=True).values, 0)
                                                  < 0.9).sum()) + 1 for i in present},
        })
    return {"layers": per_layer}
