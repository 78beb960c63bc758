"""``xshare bench costmodel``: the calibrated cost model's MoE-layer and decode-step times.

Per batch size it prints the modelled time of one MoE layer (one fused-MoE call on one GPU: the
busiest one under expert parallelism) with vanilla routing, the expected distinct experts behind it,
and, with ``--budget`` or ``--reduction``, the same for ``xshare`` (``xshare_ep`` under ``--ep``) and
the modelled decode-step OTPS ratio. The constants are :data:`xshare.eval.costmodel.CALIBRATION`
(fitted to SGLang's published H200 kernel times, docs/costmodel.md); every one can be overridden.

Routing (``--routing``): ``uniform`` (each token a uniformly random top-k; what SGLang's kernel
tuning benchmark feeds its kernel) or ``trace`` (synthetic logits with the ESFT traces' batch
statistics, :mod:`xshare.bench._routing`). Vanilla activation under uniform routing with one GPU or
tensor parallelism is the exact expectation; everything else (expert parallelism, trace routing,
the selector) is a seeded Monte Carlo over ``--samples`` batches through the selection core.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import numpy as np

from xshare._io import help_epilog, usage_error
from xshare.bench._common import add_int_list, format_table, write_json_atomic
from xshare.eval.costmodel import CALIBRATION, GPUS, MODELS, SGLANG_PR11730, CostModel, uniform_active

MODE = "costmodel"
HELP = "the calibrated cost model: one MoE layer's time per batch (vanilla, and xshare with --budget), OTPS ratio"

DTYPES = {  # expert bytes per param, dense bytes per param (None = the preset's), compute
    "bf16": (2.0, 2.0, "bf16"),
    "fp8": (1.0 + 4 / 128**2, 1.0 + 4 / 128**2, "fp8"),  # e4m3 + one float32 scale per 128x128 block
    "mxfp4": (4.25 / 8, None, "bf16"),  # 4-bit values + one 8-bit scale per 32; Hopper computes in BF16
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    help_epilog(p, (
        "Reproduce SGLang PR 11730's H200 measurement:\n"
        "  xshare bench costmodel --model qwen3-235b-a22b --gpu h200 --dtype fp8 --tp 8 --batch 1,2,4,8,16,24,32\n"
        "The vLLM port's setting (GPT-OSS-120B, 24 of 128 experts, concurrency 16, one H200):\n"
        "  xshare bench costmodel --model gpt-oss-120b --gpu h200 --batch 16 --budget 24 --routing trace\n"
        "See docs/costmodel.md."
    ))
    g = p.add_argument_group("setting")
    g.add_argument("--model", choices=sorted(MODELS), required=True, help="model preset")
    g.add_argument("--gpu", choices=sorted(GPUS), default="h200", help="GPU preset (default h200)")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="expert weight format (default auto: the preset's)")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel: every expert sliced over TP GPUs (default 1)")
    g.add_argument("--ep", type=int, default=1, help="expert parallel over EP GPUs, contiguous placement (default 1)")
    add_int_list(g, "--batch", [1, 2, 4, 8, 16, 24, 32], "decode batch sizes (default 1,2,4,8,16,24,32)")
    g.add_argument("--routing", choices=("uniform", "trace"), default="uniform",
                   help="uniform (random gate logits, as SGLang's kernel benchmark) or trace (the ESFT traces' "
                        "batch statistics)")
    g = p.add_argument_group("xshare (optional)")
    g.add_argument("--budget", type=int, default=None, help="xshare budget m (experts per layer)")
    g.add_argument("--reduction", type=float, default=None,
                   help="instead of --budget: the budget whose xshare routing activates this fraction fewer experts "
                        "than vanilla (found by bisection)")
    g.add_argument("--warmup-k", type=int, default=1, help="warm-up k0 (default 1)")
    g.add_argument("--gpu-cap", type=int, default=None, help="per-GPU cap for xshare_ep (default ceil(m / EP))")
    g = p.add_argument_group("decode step")
    g.add_argument("--context", type=float, default=0.0,
                   help="cached tokens per request, for the KV-cache read per step (default 0: not modelled)")
    g.add_argument("--step-overhead-us", type=float, default=0.0,
                   help="per-step time no policy changes (attention compute, sampling, scheduling; default 0)")
    g = p.add_argument_group("constants (defaults: the calibration, docs/costmodel.md)")
    g.add_argument("--moe-fixed-us", type=float, default=CALIBRATION["moe_fixed_us"])
    g.add_argument("--expert-hbm-efficiency", type=float, default=CALIBRATION["expert_hbm_efficiency"])
    g.add_argument("--hbm-efficiency", type=float, default=0.8, help="for the non-MoE weights and the KV cache")
    g.add_argument("--flops-efficiency", type=float, default=0.6)
    g.add_argument("--selector-us", type=float, default=10.0, help="selector time per MoE layer (default 10)")
    g.add_argument("--a2a-latency-us", type=float, default=10.0)
    g = p.add_argument_group("output")
    g.add_argument("--samples", type=int, default=200, help="Monte Carlo batches per batch size (default 200)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")


def _model(args: argparse.Namespace) -> Any:
    m = MODELS[args.model]
    if args.dtype == "auto":
        return m
    expert, dense, compute = DTYPES[args.dtype]
    return dataclasses.replace(m, expert_bytes_per_param=expert,
                               dense_bytes_per_param=m.dense_bytes_per_param if dense is None else dense,
                               compute=compute)


def _check(args: argparse.Namespace) -> None:
    for name in ("tp", "ep", "samples", "warmup_k"):
        if getattr(args, name) < (0 if name == "warmup_k" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup_k' else 1}")
    if args.tp > 1 and args.ep > 1:
        raise ValueError("--tp and --ep: give one of them (the model slices experts or places them, not both)")
    m = MODELS[args.model]
    if m.num_experts % args.ep:
        raise ValueError(f"--ep {args.ep} must divide the {m.num_experts} experts of {args.model}")
    if args.budget is not None and args.reduction is not None:
        raise ValueError("--budget and --reduction: give one of them")
    if args.budget is not None and not m.top_k <= args.budget <= m.num_experts:
        raise ValueError(f"--budget must be in [top_k = {m.top_k}, E = {m.num_experts}], got {args.budget}")
    if args.reduction is not None and not 0 <= args.reduction < 1:
        raise ValueError(f"--reduction must be in [0, 1), got {args.reduction}")
    if args.warmup_k > m.top_k:
        raise ValueError(f"--warmup-k must be <= top_k = {m.top_k}")
    if args.gpu_cap is not None and args.gpu_cap < 1:
        raise ValueError("--gpu-cap must be >= 1")
    for name in ("context", "step_overhead_us"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")


class _Router:
    """Monte Carlo routing statistics through the selection core (torch imported only here)."""

    def __init__(self, args: argparse.Namespace, num_experts: int, top_k: int) -> None:
        import torch

        from xshare.bench._routing import fit_sigma, synthetic_logits
        from xshare.selection import Placement, SelectorConfig, select

        self.torch, self.select, self.config_cls = torch, select, SelectorConfig
        self.synthetic_logits = synthetic_logits
        self.e, self.k, self.args = num_experts, top_k, args
        self.sigma = fit_sigma(num_experts, top_k) if args.routing == "trace" else 0.0
        self.placement = Placement.contiguous(num_experts, args.ep) if args.ep > 1 else None
        self.gpu_of = (np.arange(num_experts) // (num_experts // args.ep)) if args.ep > 1 else None

    def logits(self, batch: int) -> Any:
        return self.synthetic_logits(self.args.samples, batch, self.e, sigma=self.sigma,
                                     seed=self.args.seed * 7919 + batch)

    def stats(self, ids: Any) -> dict[str, float]:
        """ids int [S, B, k] -> mean distinct experts, mean busiest-GPU local experts, mean assignments there."""
        s = ids.shape[0]
        flat = ids.reshape(s, -1).long()
        hit = self.torch.zeros(s, self.e).scatter_(1, flat, 1.0).numpy()
        cnt = self.torch.zeros(s, self.e).scatter_add_(1, flat, self.torch.ones_like(flat, dtype=self.torch.float32))
        cnt = cnt.numpy()
        if self.gpu_of is None:
            return {"active": float(hit.sum(1).mean()), "busiest": float(hit.sum(1).mean()),
                    "assign": float(cnt.sum(1).mean())}
        g = self.args.ep
        per_gpu = np.stack([hit[:, self.gpu_of == i].sum(1) for i in range(g)], 1)  # [S, G]
        assign = np.stack([cnt[:, self.gpu_of == i].sum(1) for i in range(g)], 1)
        top = per_gpu.argmax(1)
        return {"active": float(hit.sum(1).mean()), "busiest": float(per_gpu.max(1).mean()),
                "assign": float(assign[np.arange(s), top].mean())}

    def vanilla(self, logits: Any) -> Any:
        return logits.topk(self.k, dim=-1).indices

    def budget_for(self, logits: Any, target: float) -> tuple[int, dict[str, float]]:
        """The budget whose xshare routing activates closest to ``target`` experts (busiest GPU), by
        bisection (activation grows with the budget), and its statistics."""
        lo, hi = self.k, self.e
        seen: dict[int, dict[str, float]] = {}

        def at(m: int) -> dict[str, float]:
            if m not in seen:
                seen[m] = self.stats(self.xshare(logits, m))
            return seen[m]

        while hi - lo > 1:
            mid = (lo + hi) // 2
            if at(mid)["busiest"] < target:
                lo = mid
            else:
                hi = mid
        best = min((lo, hi), key=lambda m: (abs(at(m)["busiest"] - target), m))
        return best, at(best)

    def xshare(self, logits: Any, budget: int) -> Any:
        policy = "xshare_ep" if self.placement is not None else "xshare"
        config = self.config_cls(policy=policy, budget=budget, warmup_k=self.args.warmup_k, gpu_cap=self.args.gpu_cap)
        return self.torch.stack([self.select(x, self.k, config, placement=self.placement).topk_ids for x in logits])


def _published(args: argparse.Namespace) -> dict[int, float] | None:
    meas = SGLANG_PR11730
    same = (args.model == meas.model and args.gpu == meas.gpu and args.tp == meas.tp and args.ep == 1
            and args.dtype in ("auto", "fp8") and args.routing == meas.routing)
    return dict(zip(meas.batch, meas.kernel_us, strict=True)) if same else None


class _Step:
    """The modelled times of one batch size: the fused-MoE call on the busiest GPU (memory, compute, fixed), the
    all-to-all under expert parallelism, and the whole decode step."""

    def __init__(self, args: argparse.Namespace, cm: CostModel) -> None:
        self.args, self.cm, self.model = args, cm, cm.model
        self.kernel = dataclasses.replace(cm, a2a_latency_us=0.0)  # the fused-MoE call alone; a2a_us per step
        self.zero = np.zeros((1, 1))

    def layer_us(self, active: float, assign: float, batch: int) -> dict[str, float]:
        """One MoE layer with ``active`` experts and ``assign`` token-expert pairs on the busiest GPU."""
        cm, zero = self.cm, self.zero
        t = self.kernel.layer_times(np.array([[active]]), np.array([[assign]]), zero, zero, np.array([batch]))[0]
        mem = active * cm.expert_bytes / cm.expert_bandwidth
        flops = 2.0 * self.model.params_per_expert / cm.tp * assign / cm.peak_flops
        return {"us": t * 1e6, "memory_us": mem * 1e6, "compute_us": flops * 1e6}

    def a2a_us(self, batch: int) -> float:
        """The dispatch and combine all-to-all of one layer (0 without expert parallelism)."""
        args, model = self.args, self.model
        if args.ep == 1:
            return 0.0
        # every token goes to the GPUs of its experts and back: about B * (1 - 1/G) tokens each way per GPU
        vol = batch * (1 - 1 / args.ep) * model.top_k / args.ep * model.hidden * self.cm.act_bytes
        return 2 * (args.a2a_latency_us + vol / self.cm.link_bandwidth * 1e6)

    def add_step(self, row: dict[str, Any], policy: bool) -> None:
        """The decode step: non-MoE weights + every MoE layer (+ selector) + KV cache + a fixed overhead."""
        args, cm, b = self.args, self.cm, row["batch"]
        fixed_ms = (cm.non_moe_seconds() + cm.kv_seconds(b, args.context)) * 1e3 + args.step_overhead_us * 1e-3
        row["non_moe_ms"] = cm.non_moe_seconds() * 1e3
        row["kv_ms"] = cm.kv_seconds(b, args.context) * 1e3
        row["step_ms"] = fixed_ms + self.model.moe_layers * (row["moe_layer_us"] + row["a2a_us"]) * 1e-3
        if policy:
            row["xshare_step_ms"] = fixed_ms + self.model.moe_layers * (
                row["xshare_moe_layer_us"] + row["a2a_us"] + args.selector_us) * 1e-3
            row["otps_ratio"] = row["step_ms"] / row["xshare_step_ms"]


def _row(step: _Step, router: _Router | None, b: int, exact: bool, policy: bool,
         published: dict[int, float] | None) -> dict[str, Any]:
    """The figures of batch size ``b``: vanilla's activated experts and layer time, the published time, xshare's."""
    args, e, k = step.args, step.model.num_experts, step.model.top_k
    row: dict[str, Any] = {"batch": b}
    if router is None:
        v = {"active": float(uniform_active(e, k, b)), "busiest": float(uniform_active(e, k, b)),
             "assign": float(b * k)}
        logits = None
    else:
        logits = router.logits(b)
        v = router.stats(router.vanilla(logits))
        if exact:
            v["active"] = v["busiest"] = float(uniform_active(e, k, b))
    lt = step.layer_us(v["busiest"], v["assign"], b)
    row.update({"active_experts": v["busiest"], "active_experts_total": v["active"],
                "moe_layer_us": lt["us"], "memory_us": lt["memory_us"], "compute_us": lt["compute_us"],
                "fixed_us": args.moe_fixed_us, "a2a_us": step.a2a_us(b)})
    if published is not None and b in published:
        row["published_us"] = published[b]
        row["error"] = lt["us"] / published[b] - 1
    if policy:
        if args.budget is not None:
            budget, x = args.budget, router.stats(router.xshare(logits, args.budget))
        else:
            budget, x = router.budget_for(logits, (1 - args.reduction) * v["busiest"])
        xt = step.layer_us(x["busiest"], x["assign"], b)
        row.update({"budget": budget, "xshare_active_experts": x["busiest"],
                    "xshare_active_experts_total": x["active"], "xshare_moe_layer_us": xt["us"],
                    "moe_speedup": lt["us"] / xt["us"]})
    step.add_step(row, policy)
    return row


def run(args: argparse.Namespace) -> int:
    try:
        _check(args)
        model = _model(args)
        cm = CostModel(GPUS[args.gpu], model, args.ep, hbm_efficiency=args.hbm_efficiency,
                       flops_efficiency=args.flops_efficiency, a2a_latency_us=args.a2a_latency_us,
                       selector_us=args.selector_us, tp=args.tp, moe_fixed_us=args.moe_fixed_us,
                       expert_hbm_efficiency=args.expert_hbm_efficiency)
    except ValueError as e:
        return usage_error("xshare bench costmodel", e)
    policy = args.budget is not None or args.reduction is not None
    exact = args.routing == "uniform" and args.ep == 1
    router = None if exact and not policy else _Router(args, model.num_experts, model.top_k)
    published = _published(args)
    step = _Step(args, cm)
    rows = [_row(step, router, b, exact, policy, published) for b in args.batch]

    _print(args, cm, rows, published is not None, policy, router)
    if args.json:
        settings = {k_: v_ for k_, v_ in vars(args).items() if not k_.startswith("_")}
        settings.update({"routing_detail": _routing_note(args, router), "sigma": getattr(router, "sigma", 0.0),
                         "assumptions": cm.assumptions(), "cost_model": cm.describe()})
        if published is not None:
            settings["published"] = dataclasses.asdict(SGLANG_PR11730)
        write_json_atomic(args.json, {"schema": "xshare-costmodel/1", "settings": settings, "results": rows})
        print(f"wrote {args.json}")
    return 0


def _routing_note(args: argparse.Namespace, router: _Router | None) -> str:
    if router is None:
        return "uniform routing, exact expectation E(1 - (1 - k/E)^B)"
    src = ("uniform (iid normal logits)" if args.routing == "uniform"
           else f"trace statistics (synthetic logits, sigma = {router.sigma})")
    return f"{src}; Monte Carlo over {args.samples} batches per batch size, seed {args.seed}, through xshare.selection"


def _print(args: argparse.Namespace, cm: CostModel, rows: list[dict[str, Any]], published: bool, policy: bool,
           router: _Router | None) -> None:
    head = ["B", "active", "moe_layer_us"]
    if published:
        head += ["published_us", "error"]
    if policy:
        head += ["m", "xs_active", "xs_layer_us", "speedup"]
    head += ["step_ms"] + (["xs_step_ms", "otps_ratio"] if policy else [])
    table = []
    for r in rows:
        line = [str(r["batch"]), f"{r['active_experts']:.1f}", f"{r['moe_layer_us']:.1f}"]
        if published:
            line += ([f"{r['published_us']:.1f}", f"{100 * r['error']:+.1f}%"] if "published_us" in r else ["-", "-"])
        if policy:
            line += [str(r["budget"]), f"{r['xshare_active_experts']:.1f}", f"{r['xshare_moe_layer_us']:.1f}",
                     f"{r['moe_speedup']:.2f}"]
        line.append(f"{r['step_ms']:.2f}")
        if policy:
            line += [f"{r['xshare_step_ms']:.2f}", f"{r['otps_ratio']:.3f}"]
        table.append(line)
    par = f"TP {args.tp}" if args.tp > 1 else (f"EP {args.ep}" if args.ep > 1 else "1 GPU")
    print(f"xshare bench costmodel: {cm.model.name} on {cm.gpu.name}, {par}, experts at "
          f"{cm.model.expert_bytes_per_param:.4g} B/param; {_routing_note(args, router)}")
    print(f"one MoE layer = {args.moe_fixed_us:g} us + active x {cm.expert_bytes / 1e6:.3f} MB / "
          f"({cm.gpu.hbm_bandwidth / 1e12:.2f} TB/s x {cm.expert_bandwidth / cm.gpu.hbm_bandwidth:.3g})"
          + (" (busiest GPU)" if args.ep > 1 else ""))
    print(format_table(head, table))
    if policy:
        print(f"step = non-MoE weights + {cm.model.moe_layers} MoE layers (+ {args.selector_us:g} us selector each "
              f"for xshare) + KV ({args.context:g} tokens of context) + {args.step_overhead_us:g} us fixed; "
              "otps_ratio = step_ms / xs_step_ms")
    if published:
        worst = max(abs(r["error"]) for r in rows if "error" in r) if any("error" in r for r in rows) else math.nan
        print(f"published: {SGLANG_PR11730.source}; worst |error| {100 * worst:.1f}%")
