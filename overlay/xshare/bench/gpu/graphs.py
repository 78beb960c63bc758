"""Part 2: the selector (kernel and torch) captured once in a CUDA graph, its knobs, logits and
``num_tokens`` changed in place and the graph replayed without recapture (on the CPU: the recorded
launch re-launched), each replay checked against an eager call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from xshare.bench.gpu.context import Context
from xshare.bench.gpu.timing import cuda_graph


def _recorded(ctx: Context, backend: str, kw: dict[str, Any]) -> tuple[Callable[[], None], Any, str]:
    """Record the selector once; return (replay, the routing its replays write into, mode)."""
    from xshare.selection import Routing, select
    from xshare.selection.backends.triton.launch import run_launch
    from xshare.selection.backends.triton.route import prepare_select

    if ctx.device.type == "cuda":
        def call() -> Any:
            return select(**kw, backend="triton") if backend == "triton" else select(**kw)

        graph, out = cuda_graph(call)
        return graph.replay, out, "cuda-graph"
    if backend == "torch":  # no graphs on the CPU: a replay is a call; results copied into fixed buffers
        first = select(**kw)
        holder = Routing(first.topk_ids.clone(), first.topk_weights.clone(), first.active.clone(), None)

        def again() -> None:
            r = select(**kw)
            holder.topk_ids.copy_(r.topk_ids)
            holder.topk_weights.copy_(r.topk_weights)
            holder.active.copy_(r.active)

        return again, holder, "cpu-call"
    launch = prepare_select(kw["router_logits"], kw["top_k"], kw["config"], placement=kw.get("placement"),
                            num_tokens=kw["num_tokens"], knobs=kw["knobs"])

    def relaunch() -> None:  # the recorded arguments, as a graph replays them (the zeroed buffer re-zeroed)
        launch.zero.zero_()
        run_launch(launch, interpret=True)

    relaunch()
    out = launch.out
    return relaunch, Routing(out.topk_ids, out.topk_weights, out.active, None), "cpu-relaunch"


def part_cuda_graph(ctx: Context) -> dict[str, Any]:
    from xshare.selection import Placement, SelectorConfig, SelectorKnobs, select
    from xshare.selection.backends.triton.cases import compare

    rows_n, e, k = (8, 32, 4) if ctx.cpu else (16, 128, 8)
    runs, ok = [], True
    for backend in ("triton", "torch"):
        for policy in ("xshare", "xshare_ep"):
            if ctx.past("cuda_graph"):
                break
            gen = torch.Generator().manual_seed(ctx.args.seed + 17)
            base = SelectorConfig(policy=policy, budget=e // 4, warmup_k=1)
            knobs = SelectorKnobs.create(base, e, k, ctx.device)
            placement = Placement.contiguous(e, 4).to(ctx.device) if policy == "xshare_ep" else None
            logits = torch.randn(rows_n, e, generator=gen).to(ctx.device)
            num_tokens = torch.tensor(rows_n, device=ctx.device)
            kw = {"router_logits": logits, "top_k": k, "config": base, "placement": placement,
                  "num_tokens": num_tokens, "knobs": knobs, "validate": False}
            replay, captured, mode = _recorded(ctx, backend, kw)
            changes = [({}, True), ({"budget": e // 16}, True), ({"budget": e // 16, "warmup_k": 0}, True),
                       ({"warmup_k": 2}, True), ({"gpu_cap": 2}, True), ({}, False),
                       ({"min_tokens": rows_n + 1}, True), ({"max_tokens": rows_n - 3}, True), ({"budget": 1.0}, True)]
            steps, distinct = [], set()
            for i, (change, enabled) in enumerate(changes):
                knobs.update(base.replace(**change), enabled=enabled)
                logits.copy_(torch.randn(rows_n, e, generator=gen).to(ctx.device))  # a new batch, same buffer
                num_tokens.fill_(rows_n - (i % 3))  # the rest is padding
                replay()
                reference = select(**kw)  # eager, reading the same knobs
                ctx.sync()
                diffs = compare(reference, captured)
                ok &= not diffs
                active = int(captured.active.sum())
                distinct.add(active)
                steps.append({"change": {**change, "enabled": enabled}, "num_tokens": rows_n - (i % 3),
                              "active": active, "diffs": diffs})
            followed = len(distinct) >= 3
            ok &= followed
            runs.append({"backend": backend, "policy": policy, "mode": mode, "replays": len(steps),
                         "equal": all(not s["diffs"] for s in steps), "distinct_active": sorted(distinct),
                         "followed_knobs": followed, "steps": steps})
    complete = len(runs) == 4
    return {"status": "ok" if ok and complete else ("fail" if not ok else "incomplete"), "shape": [rows_n, e, k],
            "runs": runs}
