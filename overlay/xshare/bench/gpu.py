"""``xshare bench gpu``: the prepared first-GPU check (one command, one JSON, one markdown table).

For a machine with one CUDA GPU where only torch, triton and numpy are installed and nothing can be
downloaded: every input is generated here or carried inside the repository. Four parts, in this
order, the report rewritten after each so that a run cut off still leaves the first parts:

1. **selector vs reference**: the fused Triton selector (``fused_select(backend='triton')``) against
   the torch reference ``select`` on the device, over the randomised cases of
   ``tests/test_kernel_interpret.py`` (:mod:`xshare.selection.kernels.cases`: both policies the kernel
   implements, softmax and sigmoid routers, renormalisation on and off, plus the fixed cases), and
   ``--extra-cases`` more random seeds: ids identical, weights within 1e-6.
2. **CUDA graph**: the selector (kernel and torch) captured once with device knobs, ``num_tokens`` and
   placement; budget, warm-up, GPU cap, on/off, batch-size range, logits and ``num_tokens`` then
   changed in place and the graph replayed without recapture, each replay checked against an eager
   reference call.
3. **selector timing**: per MoE layer call, CUDA-graph replays of many calls between CUDA events,
   vanilla top-k vs the torch selector vs the fused kernel, over B x E x top_k.
4. **MoE layer**: the project's own fused-MoE Triton kernel (:mod:`xshare.bench._fused_moe`; SGLang's
   kernel cannot be loaded without SGLang's runtime) on the layer shapes of GPT-OSS-120B,
   Qwen3-235B-A22B (TP 8 slice) and DeepSeek-V3 (EP 8, the busiest GPU's 32 local experts), with
   vanilla routing vs the selector's routing of batches whose statistics are the ESFT traces'
   (:mod:`xshare.bench._routing`): kernel-level speed-up and the selector's share of the layer.

``--cpu`` runs the same code paths on the CPU at a tiny size (kernels in Triton's interpreter, CPU
"replays" re-launch the recorded launch, times by ``perf_counter``): CI runs it so the check cannot rot.
Needs torch, triton, numpy and this package only (tests/test_bench_gpu.py checks the imports).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from xshare.bench._common import int_list, write_json_atomic

MODE = "gpu"
HELP = ("the prepared GPU check: Triton selector vs reference, CUDA-graph replays, selector and MoE-layer "
        "times (--cpu: the same on the CPU at CI size)")

PARTS = ("selector_vs_reference", "cuda_graph", "selector_timing", "moe_layer")
# each part stops starting new work past this share of --time-budget (unused time carries forward)
PART_END = {"selector_vs_reference": 0.35, "cuda_graph": 0.45, "selector_timing": 0.72, "moe_layer": 1.0}

# the MoE-layer shapes of part 4: routed experts E, top-k, hidden H, expert width I on this GPU,
# experts on this GPU (E / EP), the selector's policy and budget, the router's scoring
MOE_SHAPES: dict[str, dict[str, Any]] = {
    "gpt-oss-120b": dict(experts=128, top_k=4, hidden=2880, inter=2880, ep=1, policy="xshare", budget=24,
                         scoring="softmax", note="1 GPU, all 128 experts (budget 24: the vLLM port's setting)"),
    "qwen3-235b-a22b-tp8": dict(experts=128, top_k=8, hidden=4096, inter=1536 // 8, ep=1, policy="xshare",
                                budget=32, scoring="softmax", note="TP 8: every expert's 1/8 slice (I = 192)"),
    "deepseek-v3-ep8": dict(experts=256, top_k=8, hidden=7168, inter=2048, ep=8, policy="xshare_ep", budget=64,
                            scoring="sigmoid", note="EP 8: the busiest GPU's 32 local experts; xshare_ep, cap 8"),
}
CPU_MOE_SHAPES: dict[str, dict[str, Any]] = {  # the same structure at CI size
    "gpt-oss-120b": dict(MOE_SHAPES["gpt-oss-120b"], experts=16, hidden=64, inter=64, budget=6),
    "qwen3-235b-a22b-tp8": dict(MOE_SHAPES["qwen3-235b-a22b-tp8"], experts=16, hidden=64, inter=32, budget=10),
    "deepseek-v3-ep8": dict(MOE_SHAPES["deepseek-v3-ep8"], experts=32, hidden=64, inter=64, ep=4, budget=12),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "On the GPU machine (nothing installed but torch/triton/numpy):\n"
        "  PYTHONPATH=overlay python -m xshare bench gpu --out $OUT\n"
        "In CI (no GPU): xshare bench gpu --cpu --out DIR\n"
        "Writes DIR/gpu_check.json and DIR/gpu_check.md after every part. Exit status 0 when every check\n"
        "passed, 1 when one failed or a part raised (the report says which), 2 for bad arguments.\n"
        "See docs/kernel.md (GPU check)."
    )
    p.add_argument("--cpu", action="store_true", help="CPU mode: interpreter / torch, tiny sizes (CI)")
    p.add_argument("--out", default="gpu-check", help="output folder (default gpu-check/)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, in order (default all: {','.join(PARTS)})")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; parts stop starting new work past their share of it (default 420 on a GPU, "
                        "120 with --cpu)")
    p.add_argument("--seeds-per-family", type=int, default=None,
                   help="random seeds per (policy, scoring, renormalise) family (default 6 = the tests'; 2 with --cpu)")
    p.add_argument("--extra-cases", type=int, default=None,
                   help="further random cases beyond the tests' (default 200 on a GPU, 0 with --cpu)")
    p.add_argument("--batch", type=int_list("--batch"), default=None, metavar="LIST",
                   help="part 3 batch sizes (default 1,8,16,32,64; 1,8 with --cpu)")
    p.add_argument("--experts", type=int_list("--experts"), default=None, metavar="LIST",
                   help="part 3 experts per layer (default 64,128,256; 16 with --cpu)")
    p.add_argument("--top-k", type=int_list("--top-k"), default=None, metavar="LIST",
                   help="part 3 experts per token (default 4,6,8; 4 with --cpu)")
    p.add_argument("--moe-batch", type=int_list("--moe-batch"), default=None, metavar="LIST",
                   help="part 4 batch sizes (default 16,32; 8 with --cpu)")
    p.add_argument("--replays", type=int, default=None,
                   help="graph replays per timing sample (default 50 on a GPU, 2 with --cpu)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes that compile the kernels before the parts run (default min(8, CPUs - 1) "
                        "on a GPU; 0 = compile in the parts)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


# -- set-up ------------------------------------------------------------------------------------------


class Context:
    """Device, sizes and the clock of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.cpu = bool(args.cpu)
        self.device = torch.device("cpu" if self.cpu else "cuda")
        self.args = args
        self.budget = args.time_budget if args.time_budget is not None else (120.0 if self.cpu else 420.0)
        self.t0 = time.monotonic()
        self.seeds = args.seeds_per_family if args.seeds_per_family is not None else (2 if self.cpu else 6)
        self.extra = args.extra_cases if args.extra_cases is not None else (0 if self.cpu else 200)
        self.batch = args.batch or ([1, 8] if self.cpu else [1, 8, 16, 32, 64])
        self.experts = args.experts or ([16] if self.cpu else [64, 128, 256])
        self.top_k = args.top_k or ([4] if self.cpu else [4, 6, 8])
        self.moe_batch = args.moe_batch or ([8] if self.cpu else [16, 32])
        self.replays = args.replays or (2 if self.cpu else 50)
        self.inner = 1 if self.cpu else 20  # calls captured in one graph
        self.samples = 3 if self.cpu else 5
        self.moe_shapes = CPU_MOE_SHAPES if self.cpu else MOE_SHAPES
        cpus = os.cpu_count() or 1
        self.jobs = 0 if self.cpu else (args.jobs if args.jobs is not None else max(0, min(8, cpus - 1)))

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def past(self, part: str) -> bool:
        """Whether ``part`` should stop starting new work."""
        return self.elapsed() > PART_END[part] * self.budget

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _check(args: argparse.Namespace) -> list[str]:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"--parts must name parts of {', '.join(PARTS)}, got {args.parts!r}")
    for name in ("seeds_per_family", "extra_cases", "jobs"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if args.replays is not None and args.replays < 1:
        raise ValueError(f"--replays must be >= 1, got {args.replays}")
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError(f"--time-budget must be > 0, got {args.time_budget}")
    if not args.cpu and not torch.cuda.is_available():
        raise ValueError("no CUDA device here: pass --cpu for the CPU mode")
    from xshare.selection.kernels import triton_available

    if not triton_available():
        raise ValueError("Triton is not importable: the check runs the Triton kernels (pip install triton)")
    return parts


def _meta(ctx: Context) -> dict[str, Any]:
    import triton

    meta: dict[str, Any] = {
        "mode": "cpu" if ctx.cpu else "cuda",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "time_budget_s": ctx.budget,
        "seed": ctx.args.seed,
        "commit": _commit(),
    }
    try:
        import numpy

        meta["numpy"] = numpy.__version__
    except ImportError:  # not needed by the check itself
        meta["numpy"] = None
    if not ctx.cpu:
        props = torch.cuda.get_device_properties(0)
        meta.update({"device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
                     "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count})
    else:
        meta["device"] = "cpu (Triton interpreter)"
    return meta


def _commit() -> str | None:
    """The repository's HEAD commit, read from .git (no git binary needed)."""
    root = Path(__file__).resolve().parents[3]
    head = root / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            path = root / ".git" / ref[5:]
            if path.exists():
                return path.read_text().strip()
            packed = (root / ".git" / "packed-refs").read_text().splitlines()
            return next((ln.split()[0] for ln in packed if ln.endswith(ref[5:])), None)
        return ref
    except OSError:
        return None


# -- timing --------------------------------------------------------------------------------------------


def _cuda_graph(fn: Callable[[], Any], inner: int = 1) -> tuple[Any, Any]:
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
        graph, _ = _cuda_graph(fn, inner)
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
    for _ in range(3):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(ctx.samples):
        start.record()
        for _ in range(ctx.replays):
            replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3 / (ctx.replays * inner))
    return {"seconds": statistics.median(samples), "mode": mode, "calls": ctx.replays * inner}


# -- part 1: the kernel against the reference -----------------------------------------------------------


def _cases(ctx: Context) -> list[tuple[str, dict[str, Any]]]:
    from xshare.selection.kernels.cases import POLICIES, SCORINGS, grid_cases, random_case, special_cases

    cases = list(grid_cases(ctx.seeds))
    special = list(special_cases())
    if ctx.cpu:  # CI size: the all-tied cases and one GPU-cap case
        special = [c for c in special if c[0].startswith("all_tied") or c[0] == "gpu_caps[G=4-cap=2]"]
    cases += special
    families = [(p, s, r) for p in POLICIES for s in SCORINGS for r in (True, False)]
    for i in range(ctx.extra):
        p, s, r = families[i % len(families)]
        cases.append((f"extra[{p}-{s}-renorm={r}-seed={100_000 + i}]", random_case(100_000 + i, p, s, r)))
    return cases


def part_selector_vs_reference(ctx: Context) -> dict[str, Any]:
    from xshare.selection import select
    from xshare.selection.kernels import fused_select
    from xshare.selection.kernels.cases import compare, to_device

    cases = _cases(ctx)
    failures, families, done = [], {}, 0
    t0 = time.monotonic()
    for name, kw in cases:
        if ctx.past("selector_vs_reference"):
            break
        kwd = to_device(kw, ctx.device)
        ref = select(**kwd)
        got = fused_select(**kwd, backend="triton")
        ctx.sync()
        diffs = compare(ref, got)
        cfg = kw["config"]
        fam = f"{cfg.policy}/{cfg.scoring}/renorm={cfg.renormalize}"
        f = families.setdefault(fam, {"cases": 0, "passed": 0})
        f["cases"] += 1
        f["passed"] += not diffs
        done += 1
        if diffs:
            failures.append({"case": name, "diffs": diffs})
    return {
        "status": "ok" if not failures and done == len(cases) else ("fail" if failures else "incomplete"),
        "cases": len(cases), "run": done, "passed": done - len(failures), "failures": failures[:50],
        "families": families, "seconds": time.monotonic() - t0,
        "reference": f"xshare.selection.select on {ctx.device.type}", "tolerance": "ids identical, weights 1e-6",
    }


# -- part 2: CUDA graph (CPU: re-launch of the recorded launch) --------------------------------------------


def _recorded(ctx: Context, backend: str, kw: dict[str, Any]) -> tuple[Callable[[], None], Any, str]:
    """Record the selector once; return (replay, the routing its replays write into, mode)."""
    from xshare.selection import Routing, select
    from xshare.selection.kernels import dispatch, fused_select, prepare_launch

    if ctx.device.type == "cuda":
        def call() -> Any:
            return fused_select(**kw, backend="triton") if backend == "triton" else select(**kw)

        graph, out = _cuda_graph(call)
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
    launch = prepare_launch(kw["router_logits"], kw["top_k"], kw["config"], placement=kw.get("placement"),
                            num_tokens=kw["num_tokens"], knobs=kw["knobs"])
    set_k, route_k = dispatch._kernels(interpret=True)

    def relaunch() -> None:  # the recorded arguments, as a graph replays them
        set_k[launch.set_grid](**launch.set_args, num_warps=launch.set_warps, enable_fp_fusion=False)
        route_k[launch.route_grid](**launch.route_args, num_warps=launch.route_warps, enable_fp_fusion=False)

    relaunch()
    return relaunch, Routing(launch.ids, launch.weights, launch.active.view(torch.bool), None), "cpu-relaunch"


def part_cuda_graph(ctx: Context) -> dict[str, Any]:
    from xshare.selection import Placement, SelectorConfig, SelectorKnobs, select
    from xshare.selection.kernels.cases import compare

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


# -- part 3: selector time per MoE layer call ------------------------------------------------------------


def _selector_fns(ctx: Context, b: int, e: int, k: int, policy: str, budget: int, scoring: str = "softmax",
                  gpus: int = 8, seed: int = 0) -> dict[str, Callable[[], Any]]:
    from xshare.selection import Placement, SelectorConfig, SelectorKnobs, select
    from xshare.selection.kernels import fused_select

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
            "kernel": lambda: fused_select(**kw, backend="triton")}


def part_selector_timing(ctx: Context) -> dict[str, Any]:
    points, skipped = [], 0
    grid = [(b, e, k) for e in ctx.experts for k in ctx.top_k if k <= e for b in ctx.batch]
    for b, e, k in grid:
        if ctx.past("selector_timing"):
            skipped += 1
            continue
        fns = _selector_fns(ctx, b, e, k, "xshare", max(k, e // 2), seed=ctx.args.seed)
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


# -- part 4: the MoE layer, vanilla vs the selector's routing ---------------------------------------------


def _routings(ctx: Context, shape: dict[str, Any], batch: int, batches: int) -> dict[str, Any]:
    """Synthetic router logits with the traces' statistics, routed by vanilla top-k and by the selector."""
    from xshare.bench._routing import fit_sigma, synthetic_logits
    from xshare.selection import Placement, SelectorConfig, select

    e, k = shape["experts"], shape["top_k"]
    sigma = fit_sigma(e, k)
    logits = synthetic_logits(batches, batch, e, sigma=sigma, seed=ctx.args.seed * 31 + batch, device=ctx.device)
    placement = Placement.contiguous(e, shape["ep"]).to(ctx.device) if shape["ep"] > 1 else None
    cfg = {"scoring": shape["scoring"], "renormalize": True}
    vanilla = SelectorConfig(policy="topk", **cfg)
    chosen = SelectorConfig(policy=shape["policy"], budget=shape["budget"], warmup_k=1, **cfg)
    out: dict[str, Any] = {"sigma": sigma, "vanilla": [], "xshare": [], "logits": logits, "placement": placement}
    for r in range(batches):
        out["vanilla"].append(select(logits[r], k, vanilla, placement=placement))
        out["xshare"].append(select(logits[r], k, chosen, placement=placement))
    return out


def _busiest_first(routing: Any, e: int, ep: int) -> tuple[int, int]:
    """(first local expert id, activated experts) of the GPU with the most activated experts."""
    local = e // ep
    per_gpu = routing.active.reshape(ep, local).sum(1)
    g = int(per_gpu.argmax())
    return g * local, int(per_gpu[g])


def part_moe_layer(ctx: Context) -> dict[str, Any]:
    from xshare.bench._fused_moe import FusedMoE, align, moe_reference

    batches = 2 if ctx.cpu else 8  # different batches per timed call: less L2 reuse, routing averaged
    dtype = torch.bfloat16
    rows, ok, skipped = [], True, 0
    for name, shape in ctx.moe_shapes.items():
        if ctx.past("moe_layer"):
            skipped += len(ctx.moe_batch)
            continue
        e, k, h, inter, ep = shape["experts"], shape["top_k"], shape["hidden"], shape["inter"], shape["ep"]
        local = e // ep
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.args.seed + 5)
        w13 = torch.empty(local, 2 * inter, h, dtype=dtype, device=ctx.device).normal_(0, h ** -0.5, generator=gen)
        w2 = torch.empty(local, h, inter, dtype=dtype, device=ctx.device).normal_(0, inter ** -0.5, generator=gen)
        moe = FusedMoE(w13, w2)
        expert_bytes = 3 * h * inter * w13.element_size()
        for b in ctx.moe_batch:
            if ctx.past("moe_layer"):
                skipped += 1
                continue
            rt = _routings(ctx, shape, b, batches)
            x = torch.randn(b, h, generator=gen, device=ctx.device, dtype=torch.float32).to(dtype)
            row: dict[str, Any] = {"model": name, "batch": b, "experts": e, "top_k": k, "hidden": h, "inter": inter,
                                   "local_experts": local, "policy": shape["policy"], "budget": shape["budget"],
                                   "scoring": shape["scoring"], "note": shape["note"], "sigma": rt["sigma"]}
            for kind in ("vanilla", "xshare"):
                calls = []
                for routing in rt[kind]:
                    first, act = _busiest_first(routing, e, ep) if ep > 1 else (0, int(routing.active.sum()))
                    al = align(routing.topk_ids, local, first=first)
                    weights = routing.topk_weights.reshape(-1).float().contiguous()
                    calls.append((al, weights, moe.buffers(b, k, dtype), first, routing))
                # correctness of the kernel on the first batch, against the torch reference
                al0, w0, bufs0, first0, r0 = calls[0]
                got = moe(x, al0, w0, bufs0)
                ref = moe_reference(x, r0.topk_ids, r0.topk_weights, w13, w2, first=first0)
                ctx.sync()
                err = float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
                good = err < 2e-2 and bool(torch.isfinite(got).all())
                ok &= good
                if ctx.cpu:  # the timed path on the CPU is the torch reference (the interpreter is no clock)
                    def fn(calls: list = calls, x: torch.Tensor = x, w13: torch.Tensor = w13,
                           w2: torch.Tensor = w2) -> None:
                        for _, _, _, first, r in calls:
                            moe_reference(x, r.topk_ids, r.topk_weights, w13, w2, first=first)
                else:
                    def fn(calls: list = calls, x: torch.Tensor = x, moe: FusedMoE = moe) -> None:
                        for al, w, bufs, _, _ in calls:
                            moe(x, al, w, bufs)
                t = time_call(ctx, fn, inner=1)
                per_call = t["seconds"] / len(calls)
                active = statistics.mean(c[0].active for c in calls)
                row[kind] = {"active_experts": active, "us": per_call * 1e6, "mode": t["mode"],
                             "weights_gb_per_s": active * expert_bytes / per_call / 1e9, "rel_err": err,
                             "correct": good}
            fns = _selector_fns(ctx, b, e, k, shape["policy"], shape["budget"], shape["scoring"], gpus=max(ep, 1),
                                seed=ctx.args.seed)
            sel = time_call(ctx, fns["kernel"])["seconds"] * 1e6
            v, xs = row["vanilla"]["us"], row["xshare"]["us"]
            row.update({"selector_us": sel, "kernel_speedup": v / xs, "speedup_with_selector": v / (xs + sel),
                        "selector_share": sel / (sel + xs)})
            rows.append(row)
        del w13, w2, moe
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"status": ("ok" if not skipped else "incomplete") if ok else "fail", "rows": rows, "skipped": skipped,
            "kernel": ("xshare.bench._fused_moe: the project's own grouped-GEMM Triton kernel (BLOCK 16x64x64, "
                       "bf16 weights, fp32 accumulation), alignment outside the timed region"
                       + ("; CPU mode times the torch reference and checks the interpreted kernel" if ctx.cpu else "")),
            "routing": "synthetic logits with the ESFT traces' batch statistics (xshare.bench._routing)",
            "batches_per_timed_call": batches}


PART_FNS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "selector_vs_reference": part_selector_vs_reference,
    "cuda_graph": part_cuda_graph,
    "selector_timing": part_selector_timing,
    "moe_layer": part_moe_layer,
}


# -- kernel warm-up in worker processes ---------------------------------------------------------------------


def _warm_jobs(ctx: Context, parts: list[str]) -> list[tuple]:
    jobs: list[tuple] = []
    if "selector_vs_reference" in parts:
        jobs += [("case", name) for name, _ in _cases(ctx)]
    if "selector_timing" in parts:
        jobs += [("grid", b, e, k) for e in ctx.experts for k in ctx.top_k if k <= e for b in ctx.batch]
    if "moe_layer" in parts:
        jobs += [("moe", name, b) for name in ctx.moe_shapes for b in ctx.moe_batch]
    return jobs


def _warm_worker(payload: tuple[dict[str, Any], list[tuple]]) -> int:
    """Run each job once on CUDA so that its kernels are compiled into Triton's on-disk cache."""
    argd, jobs = payload
    ctx = Context(argparse.Namespace(**argd))
    from xshare.bench._fused_moe import FusedMoE, align
    from xshare.selection.kernels import fused_select
    from xshare.selection.kernels.cases import to_device

    cases = dict(_cases(ctx)) if any(j[0] == "case" for j in jobs) else {}
    done = 0
    for job in jobs:
        try:
            if job[0] == "case":
                fused_select(**to_device(cases[job[1]], ctx.device), backend="triton")
            elif job[0] == "grid":
                _, b, e, k = job
                _selector_fns(ctx, b, e, k, "xshare", max(k, e // 2), seed=ctx.args.seed)["kernel"]()
            else:
                _, name, b = job
                s = ctx.moe_shapes[name]
                _selector_fns(ctx, b, s["experts"], s["top_k"], s["policy"], s["budget"], s["scoring"],
                              gpus=max(s["ep"], 1), seed=ctx.args.seed)["kernel"]()
                w13 = torch.zeros(1, 2 * s["inter"], s["hidden"], dtype=torch.bfloat16, device=ctx.device)
                w2 = torch.zeros(1, s["hidden"], s["inter"], dtype=torch.bfloat16, device=ctx.device)
                ids = torch.zeros(b, s["top_k"], dtype=torch.int32, device=ctx.device)
                moe = FusedMoE(w13, w2)
                x = torch.zeros(b, s["hidden"], dtype=torch.bfloat16, device=ctx.device)
                moe(x, align(ids, 1), torch.ones(b * s["top_k"], device=ctx.device), moe.buffers(b, s["top_k"],
                                                                                                torch.bfloat16))
            torch.cuda.synchronize()
            done += 1
        except Exception:  # noqa: BLE001 - warming is an optimisation; the part itself reports errors
            pass
    return done


def _warm(ctx: Context, parts: list[str]) -> dict[str, Any]:
    """Compile every kernel the parts will launch in ``ctx.jobs`` spawned processes (Triton's cache is
    on disk and shared), bounded in time; any failure only means the parts compile for themselves."""
    if not ctx.jobs:
        return {"jobs": 0, "seconds": 0.0}
    import multiprocessing as mp

    jobs = _warm_jobs(ctx, parts)
    if not jobs:
        return {"jobs": 0, "seconds": 0.0}
    t0 = time.monotonic()
    argd = {k: v for k, v in vars(ctx.args).items() if not k.startswith("_")}
    chunks = [(argd, jobs[i::ctx.jobs]) for i in range(ctx.jobs) if jobs[i::ctx.jobs]]
    pool = None
    try:
        pool = mp.get_context("spawn").Pool(len(chunks))
        res = pool.map_async(_warm_worker, chunks)
        res.wait(timeout=0.3 * ctx.budget)
        done = sum(res.get(timeout=1)) if res.ready() else None
        status = "done" if res.ready() else "timed out"
    except Exception as exc:  # noqa: BLE001
        done, status = None, f"failed: {type(exc).__name__}: {exc}"
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return {"jobs": len(jobs), "workers": len(chunks), "compiled": done, "status": status,
            "seconds": time.monotonic() - t0}


# -- report ---------------------------------------------------------------------------------------------------


def _f(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _md_selector_vs_reference(p: dict[str, Any]) -> list[str]:
    return ["| family | cases | passed |", "|---|---:|---:|",
            *[f"| {f} | {v['cases']} | {v['passed']} |" for f, v in p["families"].items()],
            "", f"**{p['status']}**: {p['passed']} of {p['run']} run ({p['cases']} planned) identical ids, "
                f"weights within 1e-6; {len(p['failures'])} failures; {p['seconds']:.1f} s", ""]


def _md_cuda_graph(p: dict[str, Any]) -> list[str]:
    return ["| backend | policy | mode | replays | all equal to reference | distinct active |",
            "|---|---|---|---:|---|---|",
            *[f"| {r['backend']} | {r['policy']} | {r['mode']} | {r['replays']} | {r['equal']} | "
              f"{r['distinct_active']} |" for r in p["runs"]],
            "", f"**{p['status']}** (T, E, k = {p['shape']})", ""]


def _md_selector_timing(p: dict[str, Any]) -> list[str]:
    return ["| B | E | k | vanilla top-k | torch selector | fused kernel | kernel / top-k |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            *[f"| {q['batch']} | {q['experts']} | {q['top_k']} | {_f(q['topk_us'])} | {_f(q['select_us'])} | "
              f"{_f(q['kernel_us'])} | {_f(q['kernel_over_topk'], '.2f')} |" for q in p["points"]],
            "", f"{p['timing']}; {p['policy']}; {p['skipped']} points skipped (time budget)", ""]


def _md_moe_layer(p: dict[str, Any]) -> list[str]:
    out = ["| layer | B | active vanilla → xshare | vanilla µs | xshare µs | kernel speed-up | selector µs "
           "| selector share | speed-up with selector | weights GB/s (vanilla) |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in p["rows"]:
        v, x = r["vanilla"], r["xshare"]
        out.append(f"| {r['model']} | {r['batch']} | {v['active_experts']:.1f} → {x['active_experts']:.1f} | "
                   f"{_f(v['us'])} | {_f(x['us'])} | {_f(r['kernel_speedup'], '.2f')} | "
                   f"{_f(r['selector_us'])} | {100 * r['selector_share']:.1f}% | "
                   f"{_f(r['speedup_with_selector'], '.2f')} | {_f(v['weights_gb_per_s'], '.0f')} |")
    return [*out, "", f"**{p['status']}**; {p['kernel']}; {p['routing']}; {p['skipped']} skipped", ""]


# each part's section: (part, heading, the result key its table needs, the table and summary)
_MD_SECTIONS: tuple[tuple[str, str, str, Callable[[dict[str, Any]], list[str]]], ...] = (
    ("selector_vs_reference", "1. Triton selector vs torch reference", "families", _md_selector_vs_reference),
    ("cuda_graph", "2. CUDA graph: in-place knob changes, replays without recapture", "runs", _md_cuda_graph),
    ("selector_timing", "3. Selector time per MoE layer call (µs)", "points", _md_selector_timing),
    ("moe_layer", "4. MoE layer: vanilla vs the selector's routing", "rows", _md_moe_layer),
)


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    out = [f"# xshare bench gpu: {meta.get('device')}", "",
           f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta.get('cuda')}, Python {meta['python']}, "
           f"commit {str(meta.get('commit'))[:12]}, mode {meta['mode']}; total {report.get('seconds', 0):.0f} s", ""]
    parts = report["parts"]
    for name, heading, needs, table in _MD_SECTIONS:
        if name in parts:
            p = parts[name]
            out += [f"## {heading}", ""]
            if needs in p:
                out += table(p)
            out += _error(p)
    return "\n".join(out) + "\n"


def _error(p: dict[str, Any]) -> list[str]:
    return [f"**error**: `{p['error'].splitlines()[-1]}`", ""] if p.get("error") else []


def run(args: argparse.Namespace) -> int:
    try:
        parts = _check(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:
        print(f"xshare bench gpu: error: {e}", file=sys.stderr)
        return 2
    ctx = Context(args)
    torch.manual_seed(args.seed)
    if ctx.cpu:
        torch.set_num_threads(1)
    report: dict[str, Any] = {"schema": "xshare-gpu-check/1", "meta": _meta(ctx), "parts": {}}
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"

    def save() -> None:
        report["seconds"] = ctx.elapsed()
        write_json_atomic(json_path, report)
        tmp = md_path.with_suffix(".md.tmp")
        tmp.write_text(markdown(report))
        os.replace(tmp, md_path)

    save()
    report["warmup"] = _warm(ctx, parts)
    failed = False
    for name in parts:
        print(f"[{ctx.elapsed():6.1f} s] {name} ...", flush=True)
        t0 = time.monotonic()
        try:
            result = PART_FNS[name](ctx)
        except Exception:  # noqa: BLE001 - a part that raises is reported, and the next part still runs
            result = {"status": "error", "error": traceback.format_exc()}
        result["seconds_total"] = time.monotonic() - t0
        report["parts"][name] = result
        failed |= result["status"] in ("fail", "error")
        save()
        print(f"[{ctx.elapsed():6.1f} s] {name}: {result['status']}", flush=True)
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    from xshare.cli import main

    sys.exit(main(["bench", "gpu", *sys.argv[1:]]))
