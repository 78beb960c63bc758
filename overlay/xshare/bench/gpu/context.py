"""The run of one ``xshare bench gpu``: its parts in order, each part's share of the time budget, the
layer shapes of part 4, the router families of part 5, and :class:`Context` (device, sizes and clock)."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

PARTS = ("selector_vs_reference", "cuda_graph", "selector_timing", "moe_layer", "served_path")
# each part stops starting new work past this share of --time-budget (unused time carries forward)
PART_END = {"selector_vs_reference": 0.3, "cuda_graph": 0.38, "selector_timing": 0.56, "moe_layer": 0.74,
            "served_path": 1.0}
# the default --time-budget: the whole check ends within 5 minutes on an H200 (the last item of a part may
# run past its share; start-up is not counted), so it fits twice in a short allocation
GPU_TIME_BUDGET, CPU_TIME_BUDGET = 260.0, 120.0

# the MoE-layer shapes of part 4: routed experts E, top-k, hidden H, expert width I on this GPU,
# experts on this GPU (E / EP), the selector's policy and budget, the router's scoring, and the router
# family (SERVED_FAMILIES) whose served path gives the row's speedup_served
MOE_SHAPES: dict[str, dict[str, Any]] = {
    "gpt-oss-120b": dict(experts=128, top_k=4, hidden=2880, inter=2880, ep=1, policy="xshare", budget=24,
                         scoring="softmax", family="gpt-oss-120b",
                         note="1 GPU, all 128 experts (budget 24: the vLLM port's setting)"),
    "qwen3-235b-a22b-tp8": dict(experts=128, top_k=8, hidden=4096, inter=1536 // 8, ep=1, policy="xshare",
                                budget=32, scoring="softmax", family="qwen3-235b",
                                note="TP 8: every expert's 1/8 slice (I = 192)"),
    "deepseek-v3-ep8": dict(experts=256, top_k=8, hidden=7168, inter=2048, ep=8, policy="xshare_ep", budget=64,
                            scoring="sigmoid", family="deepseek-v3",
                            note="EP 8: the busiest GPU's 32 local experts; xshare_ep, cap 8"),
}
CPU_MOE_SHAPES: dict[str, dict[str, Any]] = {  # the same structure at CI size
    "gpt-oss-120b": dict(MOE_SHAPES["gpt-oss-120b"], experts=16, hidden=64, inter=64, budget=6),
    "qwen3-235b-a22b-tp8": dict(MOE_SHAPES["qwen3-235b-a22b-tp8"], experts=16, hidden=64, inter=32, budget=10),
    "deepseek-v3-ep8": dict(MOE_SHAPES["deepseek-v3-ep8"], experts=32, hidden=64, inter=64, ep=4, budget=12),
}

# the router families of part 5, as the models configure SGLang's TopK: routed experts E, routed top-k,
# scoring, correction bias, expert groups (kept of all), renormalisation, routed scaling factor, fused
# shared-expert slots, a recognised custom routing function
SERVED_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3-235b": dict(experts=128, top_k=8, scoring="softmax", renormalize=True,
                       note="softmax top-8, renormalised"),
    "gpt-oss-120b": dict(experts=128, top_k=4, scoring="softmax", renormalize=True,
                         note="softmax top-4, renormalised"),
    "deepseek-v3": dict(experts=256, top_k=8, scoring="sigmoid", bias=True, groups=(8, 4), renormalize=True,
                        scaling=2.5, shared=1, note="sigmoid + bias, 8 groups keep 4, scaling 2.5, fused shared slot"),
    "glm-4.5": dict(experts=160, top_k=8, scoring="sigmoid", bias=True, groups=(1, 1), renormalize=True,
                    scaling=2.5, note="sigmoid + bias, one group, scaling 2.5"),
    "kimi-k2": dict(experts=384, top_k=8, scoring="sigmoid", bias=True, groups=(1, 1), renormalize=True,
                    scaling=2.827, note="sigmoid + bias, one group, scaling 2.827"),
    "deepseek-v2": dict(experts=160, top_k=6, scoring="softmax", groups=(8, 3), renormalize=False, scaling=16.0,
                        note="grouped softmax, 8 groups keep 3, no renormalisation, scaling 16"),
    "llama4": dict(experts=128, top_k=1, scoring="sigmoid", renormalize=False, custom="llama4",
                   note="Llama-4's custom function: top-1, sigmoid weight"),
}
CPU_SERVED_FAMILIES: dict[str, dict[str, Any]] = {  # the same routers at CI size
    "qwen3-235b": dict(SERVED_FAMILIES["qwen3-235b"], experts=16, top_k=4),
    "gpt-oss-120b": dict(SERVED_FAMILIES["gpt-oss-120b"], experts=16, top_k=2),
    "deepseek-v3": dict(SERVED_FAMILIES["deepseek-v3"], experts=32, top_k=4),
    "glm-4.5": dict(SERVED_FAMILIES["glm-4.5"], experts=20, top_k=4),
    "kimi-k2": dict(SERVED_FAMILIES["kimi-k2"], experts=24, top_k=4),
    "deepseek-v2": dict(SERVED_FAMILIES["deepseek-v2"], experts=32, top_k=3),
    "llama4": dict(SERVED_FAMILIES["llama4"], experts=16),
}


class Context:
    """Device, sizes and the clock of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.cpu = bool(args.cpu)
        self.device = torch.device("cpu" if self.cpu else "cuda")
        self.args = args
        self.budget = args.time_budget if args.time_budget is not None else (
            CPU_TIME_BUDGET if self.cpu else GPU_TIME_BUDGET)
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
        self.served_families = CPU_SERVED_FAMILIES if self.cpu else SERVED_FAMILIES
        self.served_batch = getattr(args, "served_batch", None) or ([1, 4] if self.cpu else [1, 16, 64])
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
