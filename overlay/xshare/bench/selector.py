"""``xshare bench selector``: what the expert selector costs on the decode critical path.

For every point of the grid B (tokens) x E (experts) x top_k, one run times, interleaved:

* ``topk``     vanilla routing as SGLang's torch-native path computes it (softmax in float32, top-k,
               renormalise): the baseline the selector replaces;
* ``select``   the xshare selector, :func:`xshare.selection.select` (torch; the CPU path);
* ``kernel``   on CUDA only, the fused Triton selector (:func:`xshare.selection.api.select`);
* ``cpu``      on the CPU, the C fast path the serving adapter uses there
               (:func:`xshare.selection.decide.decide` with ``cpu_kernel``), when it is built;
* ``experts``  the MoE layer's expert computation for the vanilla routing, as SGLang's torch-native MoE
               (``moe_forward_native``) does it on the CPU: tokens sorted by expert, a loop over the
               activated experts, each a SwiGLU MLP (gate/up [2I, H], down [H, I]), weighted sum;
* ``experts_xshare``  the same for the selector's routing (fewer activated experts).

With ``--router`` the layer has a biased, grouped router (``deepseek_v3``: sigmoid + correction bias,
8 groups keep 4, routed scaling 2.5, a fused shared slot; ``auxfree``: the same gate without the shared
slot, as the tiny aux-loss-free model serves it): ``topk`` is then the gate itself
(:func:`xshare.selection.routers.gate.reference_route`), ``select`` the torch path of
:func:`xshare.selection.decide.decide` and ``cpu`` its C path, both with the gate's own picks as
the engine's.

On CUDA, top-k and both selectors are captured in a CUDA graph and replayed, as decode runs them
(eager if capture fails; the mode is recorded). Ratios: ``select / topk`` and the selector's share
of the MoE layer run with it, ``select / (select + experts_xshare)`` (the goal: <= 5 %).
Expert weights: ``--expert-pool`` distinct weight sets (expert e uses set e mod pool), so E = 256
does not need E experts in memory; at realistic sizes one set (9 MiB in bf16 for H = 2048,
I = 768) is far larger than the CPU caches, so each activated expert streams its weights from
memory as a real one would.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xshare._io import help_epilog, usage_error
from xshare.bench._common import Timer, add_int_list, format_table, write_json_atomic
from xshare.selection import Placement, SelectorConfig, available_policies, get_policy, select
from xshare.selection import decide as engine
from xshare.selection.backends.c.kernel import cpu_kernel_available
from xshare.selection.backends.triton.route import kernel_supports, triton_available
from xshare.selection.config import parse_count
from xshare.selection.registry import validated
from xshare.selection.routers.gate import reference_route
from xshare.selection.routers.spec import RouterSpec

MODE = "selector"
HELP = "selector time vs vanilla top-k and vs the MoE layer's expert computation, over batch x experts x top-k"

DEFAULT_BATCH = [1, 8, 16, 32, 64]
DEFAULT_EXPERTS = [64, 128, 256]
DEFAULT_TOP_K = [4, 6, 8]
GOAL_SHARE = 0.05
FIGURE_POINT = (16, 128, 8)  # the reference point: B = 16, E = 128, top_k = 8
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# --router: (expert groups, groups kept, fused shared slots) of the biased grouped gates
ROUTERS = {"plain": None, "deepseek_v3": (8, 4, 1), "auxfree": (8, 4, 0)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    help_epilog(p, (
        "Grid: every combination of --batch x --experts x --top-k (top_k > E is skipped).\n"
        "Quick single point (the reference point, Qwen3-30B-A3B expert size):\n"
        "  xshare bench selector --batch 16 --experts 128 --top-k 8 --hidden 2048 --moe-intermediate 768\n"
        "See docs/kernel.md."
    ))
    g = p.add_argument_group("grid")
    add_int_list(g, "--batch", DEFAULT_BATCH, "tokens per batch, comma-separated (default 1,8,16,32,64)")
    add_int_list(g, "--experts", DEFAULT_EXPERTS, "experts per layer E (default 64,128,256)")
    add_int_list(g, "--top-k", DEFAULT_TOP_K, "experts per token (default 4,6,8)")
    g = p.add_argument_group("MoE layer (the expert computation)")
    g.add_argument("--hidden", type=int, default=2048, help="hidden size H (default 2048, Qwen3-30B-A3B)")
    g.add_argument("--moe-intermediate", type=int, default=768,
                   help="expert intermediate size I (default 768, Qwen3-30B-A3B)")
    g.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16",
                   help="activation and weight dtype (default bfloat16, as served)")
    g.add_argument("--expert-pool", type=int, default=16,
                   help="distinct expert weight sets in memory; expert e uses set e mod pool (default 16)")
    g.add_argument("--no-experts", action="store_true", help="time only top-k and the selector")
    g = p.add_argument_group("selector")
    g.add_argument("--policy", default="xshare", help="selection policy (default xshare)")
    g.add_argument("--budget", default="0.5", help="budget m: an int, or a fraction of E (default 0.5)")
    g.add_argument("--warmup-k", type=int, default=1, help="warm-up k0 (default 1)")
    g.add_argument("--gpus", type=int, default=8, help="EP size for GPU-aware policies (default 8)")
    g.add_argument("--router", choices=sorted(ROUTERS), default="plain",
                   help="the layer's router: plain softmax top-k (default), or a biased grouped gate "
                        "(deepseek_v3: 8 groups keep 4, bias, routed scaling, shared slot; auxfree: the same "
                        "without the shared slot, the tiny aux-loss-free model's); E must be a multiple of 8")
    g = p.add_argument_group("measurement")
    g.add_argument("--repeat", type=int, default=5, help="timed samples per measurement; the median is kept (5)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the selector's tiny ops gain nothing from more, and on a "
                        "shared machine OpenMP spinning distorts every number; raise it on an idle one)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda when available, else cpu")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--json", metavar="OUT", help="also write every number to this JSON file")


# -- the timed operations -------------------------------------------------------------------------

def vanilla_topk(router_logits: Tensor, top_k: int, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Vanilla routing as SGLang's torch-native top-k: softmax in float32, top-k, renormalise."""
    weights = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(weights, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def moe_experts(x: Tensor, ids: Tensor, weights: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """The expert computation of a MoE layer, torch-native: tokens grouped by expert, one SwiGLU MLP
    per activated expert (weights ``w13[e mod pool]`` [2I, H], ``w2[e mod pool]`` [H, I]), outputs
    scattered back and summed with the routing weights."""
    num_tokens, top_k = ids.shape
    pool = w13.shape[0]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat).tolist()  # host loop over experts, as the native MoE does
    rows = x[order // top_k]
    outs = []
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        gate_up = F.linear(rows[start:start + c], w13[e % pool])
        gate, up = gate_up.chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, w2[e % pool]))
        start += c
    out = torch.cat(outs)
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return (unsorted.view(num_tokens, top_k, -1).float() * weights.unsqueeze(-1)).sum(1).to(x.dtype)


# -- the run ------------------------------------------------------------------------------------------



def _check(args: argparse.Namespace) -> SelectorConfig:
    if args.policy not in available_policies():
        raise ValueError(f"--policy must be one of {', '.join(available_policies())}, got {args.policy!r}")
    for name in ("hidden", "moe_intermediate", "expert_pool", "repeat", "gpus"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if get_policy(args.policy).needs_placement and min(args.experts) < args.gpus:
        raise ValueError(f"--gpus {args.gpus} exceeds the smallest --experts {min(args.experts)}")
    if args.warmup_k > min(args.top_k):
        raise ValueError(f"--warmup-k {args.warmup_k} exceeds the smallest --top-k {min(args.top_k)}")
    try:
        config = validated(SelectorConfig(policy=args.policy, budget=parse_count(args.budget, "--budget"),
                                          warmup_k=args.warmup_k))
    except ValueError as e:
        raise ValueError(f"selector settings: {e}") from None
    if get_policy(args.policy).groups == "required":
        raise ValueError(f"--policy {args.policy} needs request groups, which this benchmark does not make")
    if ROUTERS[args.router] is not None:
        groups, keep, shared = ROUTERS[args.router]
        bad = [e for e in args.experts if e % groups or keep * (e // groups) < max(args.top_k) + shared]
        if bad:
            raise ValueError(f"--router {args.router}: --experts {bad} do not split into {groups} groups whose "
                             f"{keep} kept hold top_k + {shared} shared experts")
        if get_policy(args.policy).needs_placement:
            raise ValueError(f"--router {args.router}: --policy {args.policy} needs a placement; the router path "
                             "runs the policies without one")
    return config


def router_spec(name: str, num_experts: int, seed: int) -> RouterSpec | None:
    """The layer's router for ``--router name`` (None: plain softmax top-k); the bias is seeded."""
    if ROUTERS[name] is None:
        return None
    groups, keep, shared = ROUTERS[name]
    bias = torch.randn(num_experts, generator=torch.Generator().manual_seed(seed)) * 0.1
    return RouterSpec(scoring="sigmoid", correction_bias=bias, num_expert_group=groups, topk_group=keep,
                      routed_scaling_factor=2.5, num_fused_shared_experts=shared)


def _decode_step(fn: Callable[[], Any], device: torch.device) -> tuple[Callable[[], Any], str]:
    """``fn`` as decode runs it: on CUDA captured once in a CUDA graph and replayed (eager if capture
    fails); on the CPU, eager (SGLang runs no graphs there)."""
    if device.type != "cuda":
        return fn, "eager"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles kernels, fills the allocator pool
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return graph.replay, "cuda-graph"
    except Exception:  # noqa: BLE001 - capture only changes how the step is measured
        return fn, "eager"


def _point(b: int, e: int, k: int, args: argparse.Namespace, config: SelectorConfig, device: torch.device,
           dtype: torch.dtype, w13: Tensor | None, w2: Tensor | None, timer: Timer) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + b * 10_007 + e * 101 + k)
    logits = torch.randn(b, e, generator=gen).to(device=device, dtype=dtype)
    placement = Placement.contiguous(e, args.gpus).to(device) if get_policy(args.policy).needs_placement else None
    spec = router_spec(args.router, e, args.seed)
    fns: dict[str, Callable[[], Any]] = {}
    modes: dict[str, str] = {}
    if spec is None:
        top_w, top_ids = vanilla_topk(logits, k)
        call = engine.LayerCall(logits, k, engine.LayerRouting(), engine_ids=top_ids, placement=placement)
        sel_ids = select(logits, k, config, placement=placement, validate=False)
        fns["topk"], modes["topk"] = _decode_step(lambda: vanilla_topk(logits, k), device)
        fns["select"], modes["select"] = _decode_step(
            lambda: select(logits, k, config, placement=placement, validate=False), device)
    else:  # the gate itself is the baseline; the selector is the engine's router-spec path
        own = reference_route(logits, k, spec)
        top_ids, top_w = own.topk_ids[:, :k], own.topk_weights[:, :k]
        # SGLang's whole outputs ride along, as the adapter passes them: the C path writes into their layout
        call = engine.LayerCall(logits, k, spec, engine_ids=top_ids, engine_outputs=(own.topk_ids, own.topk_weights))
        sel_ids = engine.decide(call, config).routing
        fns["topk"], modes["topk"] = _decode_step(lambda: reference_route(logits, k, spec), device)
        fns["select"], modes["select"] = _decode_step(lambda: engine.decide(call, config), device)
    if device.type == "cuda" and spec is None and triton_available() and kernel_supports(config, e):
        fns["kernel"], modes["kernel"] = _decode_step(
            lambda: select(logits, k, config, placement=placement, validate=False, backend="triton"), device)
    if device.type == "cpu" and cpu_kernel_available():
        fast = engine.decide(call, config, cpu_kernel=True)
        if fast.cpu is not None:  # the C path routes this call: the same routing, timed
            if not torch.equal(fast.routing.topk_ids, sel_ids.topk_ids):
                raise RuntimeError(f"the C path's routing differs from the torch path's at B={b}, E={e}, k={k}")
            fns["cpu"], modes["cpu"] = (lambda: engine.decide(call, config, cpu_kernel=True)), "eager"
        gate = dataclasses.replace(call, engine_ids=None, engine_outputs=None, engine_gate=True)
        if spec is not None and engine.gate_deferrable(gate, config, cpu_kernel=True):  # the engine's gate skipped
            if not torch.equal(engine.decide(gate, config, cpu_kernel=True).routing.topk_ids, sel_ids.topk_ids):
                raise RuntimeError(f"the C path computing the gate routes otherwise at B={b}, E={e}, k={k}")
            fns["gate"], modes["gate"] = (lambda: engine.decide(gate, config, cpu_kernel=True)), "eager"
    if w13 is not None and w2 is not None:
        x = torch.randn(b, args.hidden, generator=gen).to(device=device, dtype=dtype)
        fns["experts"] = lambda: moe_experts(x, top_ids, top_w, w13, w2)
        fns["experts_xshare"] = lambda: moe_experts(x, sel_ids.topk_ids, sel_ids.topk_weights, w13, w2)
    t = timer.run(fns)
    row: dict[str, Any] = {
        "batch": b, "experts": e, "top_k": k, "router": args.router,
        "budget": config.budget_for(e),
        "active_topk": int(torch.unique(top_ids).numel()),
        "active_select": int(sel_ids.active.sum()),
        "topk_us": t["topk"] * 1e6,
        "select_us": t["select"] * 1e6,
        "kernel_us": t["kernel"] * 1e6 if "kernel" in t else None,
        "cpu_us": t["cpu"] * 1e6 if "cpu" in t else None,
        "gate_us": t["gate"] * 1e6 if "gate" in t else None,  # the C path that computes the gate (served)
        "modes": modes,
        "select_over_topk": t["select"] / t["topk"],
    }
    if "experts" in t:
        row.update({
            "experts_us": t["experts"] * 1e6,
            "experts_xshare_us": t["experts_xshare"] * 1e6,
            "select_over_experts": t["select"] / t["experts"],
            "select_share_of_layer": t["select"] / (t["select"] + t["experts_xshare"]),
        })
        if "kernel" in t:
            row["kernel_share_of_layer"] = t["kernel"] / (t["kernel"] + t["experts_xshare"])
        if "cpu" in t:
            row["cpu_share_of_layer"] = t["cpu"] / (t["cpu"] + t["experts_xshare"])
    return row


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _expert_weights(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(w13 [pool, 2 I, H], w2 [pool, H, I]): random expert weights, or (None, None) with --no-experts."""
    if args.no_experts:
        return None, None
    pool = min(args.expert_pool, max(args.experts))
    scale = 1.0 / math.sqrt(args.hidden)
    w13 = (torch.randn(pool, 2 * args.moe_intermediate, args.hidden) * scale).to(device=device, dtype=dtype)
    w2 = (torch.randn(pool, args.hidden, args.moe_intermediate) * scale).to(device=device, dtype=dtype)
    return w13, w2


def _table(args: argparse.Namespace, points: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the printed table: times per grid point, and the selector's share of the MoE layer."""
    has_kernel = any(p["kernel_us"] is not None for p in points)
    has_cpu = any(p["cpu_us"] is not None for p in points)
    has_gate = any(p["gate_us"] is not None for p in points)
    headers = ["B", "E", "k", "topk_us", "select_us"] + (["kernel_us"] if has_kernel else []) \
        + (["cpu_us"] if has_cpu else []) + (["gate_us"] if has_gate else []) + ["sel/topk"]
    if not args.no_experts:
        headers += ["experts_us", "experts_xs_us", "active", "share%"] + (["kshare%"] if has_kernel else []) \
            + (["cshare%"] if has_cpu else [])
    rows = []
    for p in points:
        r = [str(p["batch"]), str(p["experts"]), str(p["top_k"]), _fmt(p["topk_us"]), _fmt(p["select_us"])]
        if has_kernel:
            r.append(_fmt(p["kernel_us"]))
        if has_cpu:
            r.append(_fmt(p["cpu_us"]))
        if has_gate:
            r.append(_fmt(p["gate_us"]))
        r.append(_fmt(p["select_over_topk"], ".2f"))
        if not args.no_experts:
            share = 100 * p["select_share_of_layer"]
            mark = "*" if share > 100 * GOAL_SHARE else ""
            r += [_fmt(p["experts_us"], ".0f"), _fmt(p["experts_xshare_us"], ".0f"),
                  f"{p['active_topk']}->{p['active_select']}", f"{share:.2f}{mark}"]
            if has_kernel:
                ks = p.get("kernel_share_of_layer")
                r.append("-" if ks is None else f"{100 * ks:.2f}")
            if has_cpu:
                cs = p.get("cpu_share_of_layer")
                r.append("-" if cs is None else f"{100 * cs:.2f}")
        rows.append(r)
    return headers, rows


def _meta(args: argparse.Namespace, config: Any, device: torch.device, load_before: tuple[float, ...]
          ) -> dict[str, Any]:
    """What the times were measured on and with (``meta`` in the JSON)."""
    return {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "hidden": args.hidden,
        "moe_intermediate": args.moe_intermediate,
        "expert_pool": None if args.no_experts else min(args.expert_pool, max(args.experts)),
        "selector": config.to_dict(),
        "router": args.router,
        "gpus": args.gpus if get_policy(args.policy).needs_placement else None,
        "repeat": args.repeat,
        "seed": args.seed,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def _print_report(args: argparse.Namespace, meta: dict[str, Any], points: list[dict[str, Any]]) -> None:
    """The settings line, the table, and the selector's share at the reference point."""
    print(f"xshare bench selector on {meta['device']} ({args.threads} threads, torch {torch.__version__}, "
          f"{args.dtype}; H={args.hidden}, I={args.moe_intermediate}; router {args.router}; policy {args.policy}, "
          f"budget {args.budget}, "
          f"warmup_k {args.warmup_k}); median of {args.repeat}, times in microseconds")
    print(format_table(*_table(args, points)))
    if args.no_experts:
        return
    print("share% = select / (select + experts_xshare): the selector's share of the MoE layer run with it; "
          f"* = above the {100 * GOAL_SHARE:.0f}% goal. active = activated experts, top-k -> selector.")
    fig = [p for p in points if (p["batch"], p["experts"], p["top_k"]) == FIGURE_POINT]
    if fig:
        f = fig[0]
        print(f"figure (B=16, E=128, top_k=8): selector {f['select_us']:.1f} us = "
              f"{100 * f['select_share_of_layer']:.2f}% of the MoE layer "
              f"({f['experts_xshare_us']:.0f} us of experts); vanilla top-k {f['topk_us']:.1f} us")


def run(args: argparse.Namespace) -> int:
    try:
        config = _check(args)
    except ValueError as e:
        return usage_error("xshare bench selector", e)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    w13, w2 = _expert_weights(args, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timer = Timer(repeat=args.repeat, sync=sync)
    load_before = os.getloadavg()
    points = [_point(b, e, k, args, config, device, dtype, w13, w2, timer)
              for e in args.experts for k in args.top_k if k <= e for b in args.batch]
    if not points:
        return usage_error("xshare bench selector", "no grid point has --top-k <= --experts")
    meta = _meta(args, config, device, load_before)
    _print_report(args, meta, points)
    if args.json:
        write_json_atomic(args.json, {"meta": meta, "points": points})
        print(f"wrote {args.json}")
    return 0
