"""Timing shared by the parts: CUDA-graph capture, CUDA events around graph replays (``perf_counter`` on
the CPU), the selector calls that parts 3 and 4 time, and part 3 itself (selector time per MoE layer
call over B x E x top_k)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from xshare.bench.gpu.context import Context


def cuda_graph(fn: Callable[[], Any], inner: int = 1) -> tuple[Any, Any]:
    """``fn`` warmed up twice on a side stream, then ``inner`` calls of it captured in one CUDA graph:
    (the graph, what the last captured call returned)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(graph):
        for _ in range(inner):
            out = fn()
    torch.cuda.synchronize()
    return graph, out


def _capture(fn: Callable[[], Any], inner: int) -> tuple[Callable[[], None], str]:
    """``inner`` calls of ``fn`` in one CUDA graph (warmed up on a side stream); eager if capture fails."""
    try:
        graph, _ = cuda_graph(fn, inner)
        return graph.replay, "cuda-graph"
    except Exception:  # noqa: BLE001 - capture only changes how the call is timed; the mode is recorded
        torch.cuda.synchronize()

        def eager() -> None:
            for _ in range(inner):
                fn()

        return eager, "eager"


def time_call(ctx: Context, fn: Callable[[], Any], *, inner: int | None = None) -> dict[str, Any]:
    """Seconds per call of ``fn``: the median over samples of (replays x inner calls); CUDA events
    around CUDA-graph replays on a GPU, perf_counter on the CPU."""
    inner = ctx.inner if inner is None else inner
    if ctx.device.type != "cuda":
        fn()
        samples = []
        for _ in range(ctx.samples):
            t0 = time.perf_counter()
            for _ in range(ctx.replays * inner):
                fn()
            samples.append((time.perf_counter() - t0) / (ctx.replays * inner))
        return {"seconds": statistics.median(samples), "mode": "perf_counter", "calls": ctx.replays * inner}
    replay, mode = _capture(fn, inner)
    return {**time_replays(ctx, replay, inner), "mode": mode}


def time_replays(ctx: Context, replay: Callable[[], Any], inner: int, *, replays: int | None = None) -> dict[str, Any]:
    """Seconds per call of a recorded ``replay`` that makes ``inner`` calls (a CUDA graph's replay, CUDA
    only): CUDA events around ``replays`` replays (default ``ctx.replays``), the median of the samples."""
    replays = ctx.replays if replays is None else replays
    for _ in range(3):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(ctx.samples):
        start.record()
        for _ in range(replays):
            replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3 / (replays * inner))
    return {"seconds": statistics.median(samples), "mode": "cuda-graph", "calls": replays * inner}


def selector_fns(ctx: Context, b: int, e: int, k: int, policy: str, budget: int, scoring: str = "softmax",
                 gpus: int = 8, seed: int = 0) -> dict[str, Callable[[], Any]]:
    from xshare.selection import Placement, SelectorConfig, SelectorKnobs, select

    gen = torch.Generator().manual_seed(seed * 1_000_003 + b * 10_007 + e * 101 + k)
    logits = torch.randn(b, e, generator=gen).to(device=ctx.device, dtype=torch.bfloat16)
    config = SelectorConfig(policy=policy, budget=budget, warmup_k=1, scoring=scoring)
    knobs = SelectorKnobs.create(config, e, k, ctx.device)
    num_tokens = torch.tensor(b, device=ctx.device)
    placement = Placement.contiguous(e, gpus).to(ctx.device) if policy == "xshare_ep" else None
    kw = {"router_logits": logits, "top_k": k, "config": config, "placement": placement, "num_tokens": num_tokens,
          "knobs": knobs, "validate": False}
    from xshare.bench.selector import vanilla_topk

    return {"topk": lambda: vanilla_topk(logits, k), "select": lambda: select(**kw),
            "kernel": lambda: select(**kw, backend="triton")}


def part_selector_timing(ctx: Context) -> dict[str, Any]:
    points, skipped = [], 0
    grid = [(b, e, k) for e in ctx.experts for k in ctx.top_k if k <= e for b in ctx.batch]
    for b, e, k in grid:
        if ctx.past("selector_timing"):
            skipped += 1
            continue
        fns = selector_fns(ctx, b, e, k, "xshare", max(k, e // 2), seed=ctx.args.seed)
        t = {name: time_call(ctx, fn) for name, fn in fns.items()}
        points.append({"batch": b, "experts": e, "top_k": k, "budget": max(k, e // 2),
                       **{f"{n}_us": v["seconds"] * 1e6 for n, v in t.items()},
                       "modes": {n: v["mode"] for n, v in t.items()}, "calls": t["kernel"]["calls"],
                       "kernel_over_topk": t["kernel"]["seconds"] / t["topk"]["seconds"],
                       "select_over_kernel": t["select"]["seconds"] / t["kernel"]["seconds"]})
    return {"status": "ok" if not skipped else "incomplete", "points": points, "skipped": skipped,
            "policy": "xshare, budget max(k, E/2), warm-up 1, knobs and num_tokens on the device",
            "timing": ("CUDA events over CUDA-graph replays" if not ctx.cpu else "perf_counter (CPU mode)") +
                      f": median of {ctx.samples} samples of {ctx.replays} replays x {ctx.inner} calls"}
