"""Profiling of HF decode steps: the share of a step spent in the MoE blocks (router + experts)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from xshare.models import tasks as T
from xshare.models.experts import experts_implementation
from xshare.models.routing_override import moe_blocks


@torch.no_grad()
def profile_decode(model: torch.nn.Module, tokenizer: Any, problems: Sequence[T.Problem], *, steps: int = 8,
                   experts_impl: str | None = None, repeats: int = 3) -> dict[str, Any]:
    """Share of an HF decode step spent in the MoE blocks, at batch ``len(problems)``.

    Prefills the prompts, then times ``steps`` decode steps (``repeats`` times, best kept) with
    timers around every ``Qwen3MoeSparseMoeBlock`` (router + experts)."""
    from transformers import DynamicCache

    blocks = moe_blocks(model)
    acc = {"moe": 0.0}
    starts: dict[int, float] = {}

    def pre(mod: torch.nn.Module, args: Any) -> None:
        starts[id(mod)] = time.perf_counter()

    def post(mod: torch.nn.Module, args: Any, out: Any) -> None:
        acc["moe"] += time.perf_counter() - starts.pop(id(mod))

    handles = [b.register_forward_pre_hook(pre) for b in blocks] + [b.register_forward_hook(post) for b in blocks]
    best: dict[str, float] | None = None
    try:
        with experts_implementation(model, experts_impl):
            for _ in range(repeats):
                enc = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
                b, width = len(enc), max(len(e) for e in enc)
                ids = torch.full((b, width), tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((b, width), dtype=torch.long)
                for i, e in enumerate(enc):
                    ids[i, width - len(e):] = torch.tensor(e)
                    mask[i, width - len(e):] = 1
                cache = DynamicCache(config=model.config)
                out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
                nxt = out.logits[:, -1].argmax(-1)
                acc["moe"] = 0.0
                total = 0.0
                for _ in range(steps):
                    cur = mask.sum(-1, keepdim=True)
                    mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
                    t = time.perf_counter()
                    out = model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=cur,
                                past_key_values=cache, use_cache=True)
                    total += time.perf_counter() - t
                    nxt = out.logits[:, -1].argmax(-1)
                if best is None or total < best["total"]:
                    best = {"total": total, "moe": acc["moe"]}
    finally:
        for h in handles:
            h.remove()
    assert best is not None
    return {"batch": len(problems), "steps": steps, "experts_impl": experts_impl or "eager",
            "step_ms": 1000 * best["total"] / steps, "moe_ms": 1000 * best["moe"] / steps,
            "moe_share": best["moe"] / best["total"]}
