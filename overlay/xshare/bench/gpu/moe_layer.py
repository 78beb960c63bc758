"""Part 4: one MoE layer (the project's fused-MoE Triton kernel, :mod:`xshare.bench._fused_moe`) with
vanilla routing against the selector's routing of batches with the ESFT traces' statistics; the speed-up
with the bare fused selector's time per call and with the served path's (the plugin's routing hook as
SGLang calls it, :mod:`.served`)."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from xshare.bench.gpu.context import Context
from xshare.bench.gpu.served import served_for_shape
from xshare.bench.gpu.timing import selector_fns, time_call


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
            fns = selector_fns(ctx, b, e, k, shape["policy"], shape["budget"], shape["scoring"], gpus=max(ep, 1),
                               seed=ctx.args.seed)
            sel = time_call(ctx, fns["kernel"])["seconds"] * 1e6
            v, xs = row["vanilla"]["us"], row["xshare"]["us"]
            row.update({"selector_us": sel, "kernel_speedup": v / xs, "speedup_with_selector": v / (xs + sel),
                        "selector_share": sel / (sel + xs)})
            served = served_for_shape(ctx, shape, b)
            ok &= served["correct"]
            row["served"] = {key: served[key] for key in ("served_us", "mode", "correct", "fallback", "capture_error",
                                                         "diffs", "log", "backend")}
            # the routing hook's time replaces the bare selector's; none when the hook left the call to SGLang
            row["served_us"] = served["served_us"] if served["correct"] else None
            row["speedup_served"] = v / (xs + row["served_us"]) if row["served_us"] is not None else None
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
