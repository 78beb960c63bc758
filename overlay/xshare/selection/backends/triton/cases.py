"""Randomised selector cases: the fused kernel against the torch reference, on any device.

One generator for the interpreter tests (``tests/selection/test_kernel_interpret.py``, CPU tensors) and for
``xshare bench gpu`` (the same cases on CUDA), so the GPU check replays exactly what the tests
prove on the CPU. Every case is a keyword dict for :func:`xshare.selection.select` /
:func:`~xshare.selection.select`; inputs are drawn on the CPU from the seed (the same
numbers on every device) and then moved with :func:`to_device`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from xshare.selection.config import SelectorConfig
from xshare.selection.knobs import SelectorKnobs
from xshare.selection.types import Placement

KINDS = ("normal", "discrete", "binary", "duplicated")
POLICIES = ("xshare", "xshare_ep")  # what the kernel implements
SCORINGS = ("softmax", "sigmoid")  # the router families it implements (softmax and sigmoid gates)


def make_logits(gen: torch.Generator, num_rows: int, num_experts: int, kind: str, *, masked: bool) -> Tensor:
    """Router logits float32 [num_rows, num_experts] of one ``kind`` (see KINDS), ``-inf`` holes if ``masked``."""
    if kind == "normal":
        x = torch.randn(num_rows, num_experts, generator=gen) * 2
    elif kind == "discrete":  # many exact ties inside each token
        values = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
        x = values[torch.randint(0, len(values), (num_rows, num_experts), generator=gen)]
    elif kind == "binary":  # ties everywhere, also between the batch's column sums
        x = torch.randint(0, 2, (num_rows, num_experts), generator=gen).float()
    elif kind == "duplicated":  # duplicated experts (tied column sums) and duplicated tokens
        x = torch.randn(num_rows, num_experts, generator=gen)
        src = torch.randint(0, num_experts, (max(1, num_experts // 3),), generator=gen)
        dst = torch.randint(0, num_experts, (max(1, num_experts // 3),), generator=gen)
        x[:, dst] = x[:, src].clone()
        if num_rows > 1:
            x[torch.randint(0, num_rows, (num_rows // 2,), generator=gen)] = x[0].clone()
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if masked:
        x = x.masked_fill(torch.rand(num_rows, num_experts, generator=gen) < 0.3, float("-inf"))
        if num_rows > 2:
            x[0] = float("-inf")  # a token with no usable expert
            x[1, : num_experts - 1] = float("-inf")  # one usable expert (< top_k)
    return x


def random_case(seed: int, policy: str, scoring: str, renormalize: bool) -> dict[str, Any]:
    """One randomised case (CPU tensors): layer size, batch, budget, warm-up, caps, batch-size range,
    padding with garbage rows, num_tokens as int / tensor / knobs, placements over 1..8 GPUs."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_experts = rnd.choice([5, 8, 16, 60, 64, 128])
    top_k = min(num_experts, rnd.choice([1, 2, 4, 6, 8]))
    num_rows = rnd.choice([1, 2, 3, 9, 16, 33])
    config = SelectorConfig(
        policy=policy, budget=rnd.choice([1, 3, 0.1, 0.25, 0.5, 1.0]), warmup_k=rnd.randint(0, min(2, top_k)),
        scoring=scoring, renormalize=renormalize, gpu_cap=rnd.choice([None, None, 1, 3]),
        min_tokens=rnd.choice([0, 1, 1, 4]), max_tokens=rnd.choice([None, None, 20]),
    )
    logits = make_logits(gen, num_rows, num_experts, rnd.choice(KINDS), masked=rnd.random() < 0.5)
    kw: dict[str, Any] = {"router_logits": logits, "top_k": top_k, "config": config}
    if policy == "xshare_ep":
        gpus = min(num_experts, rnd.choice([1, 2, 4, 8]))
        kw["placement"] = (Placement.contiguous(num_experts, gpus) if rnd.random() < 0.5 else
                           Placement.from_expert_gpu(torch.randint(0, gpus, (num_experts,), generator=gen), gpus))
    mode = rnd.choice(["none", "int", "tensor", "knobs"])
    if mode != "none":
        n = rnd.randint(0, num_rows)
        kw["num_tokens"] = n if mode == "int" else torch.tensor(n)
        if mode == "knobs":
            kw["knobs"] = SelectorKnobs.create(config, num_experts, top_k, enabled=rnd.random() < 0.8)
        if n < num_rows:  # padding rows hold garbage, as CUDA-graph padding may
            logits[n:] = torch.where(torch.rand(num_rows - n, num_experts, generator=gen) < 0.5, float("nan"), 30.0)
            kw["validate"] = False
    return kw


def grid_cases(seeds: int = 6) -> Iterator[tuple[str, dict[str, Any]]]:
    """The parametrised random cases of tests/selection/test_kernel_interpret.py: seeds x policies x scorings x
    renormalisation, named like the test ids."""
    for policy in POLICIES:
        for scoring in SCORINGS:
            for renormalize in (True, False):
                for seed in range(seeds):
                    name = f"random[{policy}-{scoring}-renorm={renormalize}-seed={seed}]"
                    yield name, random_case(1000 * seed + 7, policy, scoring, renormalize)


def special_cases() -> Iterator[tuple[str, dict[str, Any]]]:
    """The fixed-input cases of the interpreter tests: all-tied batch, GPU caps over placements,
    replicas, input dtypes and strides, a layer in several row blocks."""
    for policy in POLICIES:
        kw: dict[str, Any] = {"router_logits": torch.zeros(6, 32), "top_k": 4,
                              "config": SelectorConfig(policy=policy, budget=8, warmup_k=1)}
        if policy == "xshare_ep":
            kw["placement"] = Placement.contiguous(32, 4)
        yield f"all_tied[{policy}]", kw
    for gpus in (1, 2, 4, 8):
        for cap in (None, 1, 2, 5):
            gen = torch.Generator().manual_seed(gpus * 10 + (cap or 0))
            logits = make_logits(gen, 16, 64, "duplicated", masked=False)
            placement = Placement.from_expert_gpu(torch.randint(0, gpus, (64,), generator=gen), gpus)
            yield f"gpu_caps[G={gpus}-cap={cap}]", {
                "router_logits": logits, "top_k": 8, "placement": placement,
                "config": SelectorConfig(policy="xshare_ep", budget=12, warmup_k=1, gpu_cap=cap)}
    gen = torch.Generator().manual_seed(3)
    p2l = torch.cat([torch.arange(32), torch.randint(0, 32, (8,), generator=gen)])
    placement = Placement.from_physical(p2l[torch.randperm(40, generator=gen)], 4, 32)
    logits = make_logits(gen, 12, 32, "normal", masked=False)
    for policy in POLICIES:
        for max_tokens in (None, 4):
            yield f"replicas[{policy}-max_tokens={max_tokens}]", {
                "router_logits": logits, "top_k": 4, "placement": placement,
                "config": SelectorConfig(policy=policy, budget=10, max_tokens=max_tokens)}
    for dtype in (torch.bfloat16, torch.float16):  # the logits dtypes the kernels read (kernel_problem)
        gen = torch.Generator().manual_seed(2)
        lg = make_logits(gen, 40, 24, "normal", masked=True).to(dtype)
        config = SelectorConfig(policy="xshare", budget=6, warmup_k=2)
        yield f"dtype[{str(dtype).removeprefix('torch.')}]", {"router_logits": lg, "top_k": 6, "config": config}
        yield f"dtype[{str(dtype).removeprefix('torch.')}-column-major]", {
            "router_logits": lg.t().contiguous().t(), "top_k": 6, "config": config}
    gen = torch.Generator().manual_seed(8)
    yield "blocks[300x256]", {
        "router_logits": make_logits(gen, 300, 256, "discrete", masked=False), "top_k": 8,
        "config": SelectorConfig(policy="xshare_ep", budget=64, warmup_k=1),
        "placement": Placement.contiguous(256, 8), "num_tokens": torch.tensor(290), "validate": False}


def to_device(kw: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The case with every tensor (logits, num_tokens, placement, knobs) on ``device``; strides kept."""
    device = torch.device(device)
    out = dict(kw)
    logits = kw["router_logits"]
    moved = torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype, device=device)
    moved.copy_(logits)
    out["router_logits"] = moved
    if isinstance(kw.get("num_tokens"), Tensor):
        out["num_tokens"] = kw["num_tokens"].to(device)
    if kw.get("placement") is not None:
        out["placement"] = kw["placement"].to(device)
    if kw.get("knobs") is not None:
        k = kw["knobs"]
        values = {f.name: getattr(k, f.name) for f in dataclasses.fields(k)}  # every knob, whatever they are
        out["knobs"] = SelectorKnobs(**{n: v.to(device) if isinstance(v, Tensor) else v
                                        for n, v in values.items()})
    return out


def compare(ref: Any, got: Any, *, atol: float = 1e-6) -> list[str]:
    """Differences between two Routings (empty = the same): ids, active, physical ids identical,
    weights within ``atol``, the kernel's dtypes."""
    diffs = []
    if not torch.equal(got.topk_ids.cpu(), ref.topk_ids.cpu()):
        rows = (got.topk_ids.cpu() != ref.topk_ids.cpu()).any(1).nonzero().reshape(-1).tolist()
        diffs.append(f"topk_ids differ in rows {rows[:8]}{'...' if len(rows) > 8 else ''}")
    if not torch.equal(got.active.cpu(), ref.active.cpu()):
        diffs.append("active differs")
    if got.topk_ids.dtype != torch.int32 or got.topk_weights.dtype != torch.float32:
        diffs.append(f"dtypes {got.topk_ids.dtype}/{got.topk_weights.dtype}, expected int32/float32")
    err = (got.topk_weights.cpu().double() - ref.topk_weights.cpu().double()).abs()
    err = float(torch.nan_to_num(err, nan=float("inf")).max()) if err.numel() else 0.0
    if err > atol:
        diffs.append(f"weights differ by {err:.3g} > {atol:g}")
    if (ref.physical_ids is None) != (got.physical_ids is None):
        diffs.append("physical_ids present in one only")
    elif ref.physical_ids is not None and not torch.equal(got.physical_ids.cpu(), ref.physical_ids.cpu()):
        diffs.append("physical_ids differ")
    return diffs
