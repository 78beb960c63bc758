"""Before the parts: every kernel they will launch compiled in spawned worker processes (Triton's cache
is on disk and shared), bounded in time."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from xshare.bench.gpu.context import Context
from xshare.bench.gpu.correctness import selector_cases
from xshare.bench.gpu.served import warm_call
from xshare.bench.gpu.timing import selector_fns


def _warm_jobs(ctx: Context, parts: list[str]) -> list[tuple]:
    jobs: list[tuple] = []
    if "selector_vs_reference" in parts:
        jobs += [("case", name) for name, _ in selector_cases(ctx)]
    if "selector_timing" in parts:
        jobs += [("grid", b, e, k) for e in ctx.experts for k in ctx.top_k if k <= e for b in ctx.batch]
    if "moe_layer" in parts:
        jobs += [("moe", name, b) for name in ctx.moe_shapes for b in ctx.moe_batch]
    if "served_path" in parts:
        jobs += [("served", name, b) for name in ctx.served_families for b in ctx.served_batch]
    return jobs


def _warm_worker(payload: tuple[dict[str, Any], list[tuple]]) -> int:
    """Run each job once on CUDA so that its kernels are compiled into Triton's on-disk cache."""
    argd, jobs = payload
    ctx = Context(argparse.Namespace(**argd))
    from xshare.bench._fused_moe import FusedMoE, align
    from xshare.selection import select
    from xshare.selection.backends.triton.cases import to_device

    cases = dict(selector_cases(ctx)) if any(j[0] == "case" for j in jobs) else {}
    done = 0
    for job in jobs:
        try:
            if job[0] == "case":
                select(**to_device(cases[job[1]], ctx.device), backend="triton")
            elif job[0] == "served":
                warm_call(ctx, ctx.served_families[job[1]], job[2])
            elif job[0] == "grid":
                _, b, e, k = job
                selector_fns(ctx, b, e, k, "xshare", max(k, e // 2), seed=ctx.args.seed)["kernel"]()
            else:
                _, name, b = job
                s = ctx.moe_shapes[name]
                selector_fns(ctx, b, s["experts"], s["top_k"], s["policy"], s["budget"], s["scoring"],
                             gpus=max(s["ep"], 1), seed=ctx.args.seed)["kernel"]()
                w13 = torch.zeros(1, 2 * s["inter"], s["hidden"], dtype=torch.bfloat16, device=ctx.device)
                w2 = torch.zeros(1, s["hidden"], s["inter"], dtype=torch.bfloat16, device=ctx.device)
                ids = torch.zeros(b, s["top_k"], dtype=torch.int32, device=ctx.device)
                moe = FusedMoE(w13, w2)
                x = torch.zeros(b, s["hidden"], dtype=torch.bfloat16, device=ctx.device)
                moe(x, align(ids, 1), torch.ones(b * s["top_k"], device=ctx.device), moe.buffers(b, s["top_k"],
                                                                                                torch.bfloat16))
                warm_call(ctx, dict(ctx.served_families[s["family"]], experts=s["experts"], top_k=s["top_k"]), b,
                          s["policy"], s["budget"], s["ep"] if s["ep"] > 1 else None)
            torch.cuda.synchronize()
            done += 1
        except Exception:  # noqa: BLE001 - warming is an optimisation; the part itself reports errors
            pass
    return done


def warm(ctx: Context, parts: list[str]) -> dict[str, Any]:
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
    except Exception as exc:  # noqa: BLE001 - a pool that fails is reported; the parts then compile for themselves
        done, status = None, f"failed: {type(exc).__name__}: {exc}"
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return {"jobs": len(jobs), "workers": len(chunks), "compiled": done, "status": status,
            "seconds": time.monotonic() - t0}
