"""Greedy decoding of a batch with a KV cache (HF transformers), optionally through a routing override."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from xshare.models.routing_override import RoutingOverride


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                  override: RoutingOverride | None = None, row_task: torch.Tensor | None = None,
                  timings: dict[str, float] | None = None) -> list[list[int]]:
    """Greedy decoding of a batch (left padding, KV cache); stops a row at EOS. Returns new token ids."""
    from transformers import DynamicCache

    enc = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    if not enc:
        return []
    b, width = len(enc), max(len(e) for e in enc)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = torch.arange(b)
    task = row_task if row_task is not None else torch.zeros(b, dtype=torch.long)
    cache = DynamicCache(config=model.config)
    if override is not None:
        override.begin_forward("prefill", mask.reshape(-1).bool(), rows.repeat_interleave(width),
                               task.repeat_interleave(width))
    t0 = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    t1 = time.perf_counter()
    nxt = out.logits[:, -1].argmax(-1)
    live = torch.ones(b, dtype=torch.bool)
    generated: list[list[int]] = [[] for _ in range(b)]
    decode_s, decode_tokens = 0.0, 0
    for step in range(max_new_tokens):
        for i in live.nonzero().squeeze(1).tolist():
            generated[i].append(int(nxt[i]))
            if int(nxt[i]) == eos:
                live[i] = False
        if not bool(live.any()) or step + 1 == max_new_tokens:
            break
        cur = mask.sum(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
        if override is not None:
            override.begin_forward("decode", live.clone(), rows, task)
        ts = time.perf_counter()
        out = model(input_ids=torch.where(live, nxt, pad).unsqueeze(1), attention_mask=mask, position_ids=cur,
                    past_key_values=cache, use_cache=True)
        decode_s += time.perf_counter() - ts
        decode_tokens += int(live.sum())
        nxt = out.logits[:, -1].argmax(-1)
    if timings is not None:
        timings["prefill_s"] = timings.get("prefill_s", 0.0) + (t1 - t0)
        timings["decode_s"] = timings.get("decode_s", 0.0) + decode_s
        timings["decode_tokens"] = timings.get("decode_tokens", 0) + decode_tokens
    return generated
