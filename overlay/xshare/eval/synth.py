"""Synthetic routing traces in the trace format, for tests and for model shapes with no real trace.

Router logits per layer are drawn as  z[t, e] = popularity[l, e] + topic[s(t), l, e] + noise,
so tokens of one sequence prefer similar experts, some experts are globally hot, and batches of
tokens from different sequences overlap partially, as in real MoE routing.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def synthetic_trace(num_layers: int = 2, num_seqs: int = 24, tokens_per_seq: tuple[int, int] = (6, 14),
                    num_experts: int = 16, top_k: int = 4, seed: int = 0, scoring: str = "softmax",
                    router_logits: bool = False, batch_size: int | None = None,
                    model: str = "synthetic") -> dict[str, np.ndarray]:
    """The arrays of one trace (``np.savez`` them). ``batch_size`` adds recorded ``batch_ids``:
    consecutive chunks of that many tokens in trace order."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(tokens_per_seq[0], tokens_per_seq[1] + 1, size=num_seqs)
    seq_ids = np.repeat(np.arange(num_seqs), lengths).astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    t = seq_ids.size
    popularity = rng.normal(0.0, 1.0, size=(num_layers, 1, num_experts))
    topic = rng.normal(0.0, 1.5, size=(num_seqs, num_layers, num_experts))
    z = popularity + topic[seq_ids].transpose(1, 0, 2) + rng.normal(0.0, 1.0, size=(num_layers, t, num_experts))
    z = z.astype(np.float32)
    if scoring == "softmax":
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    else:
        p = 1.0 / (1.0 + np.exp(-z))
    order = np.argsort(-p, axis=-1, kind="stable")[..., :top_k]
    out: dict[str, Any] = {
        "topk_ids": order.astype(np.int16),
        "topk_weights": np.take_along_axis(p, order, -1).astype(np.float32),
        "seq_ids": seq_ids,
        "positions": positions,
        "meta": np.array(json.dumps({"model": model, "num_experts": num_experts, "top_k": top_k,
                                     "scoring": scoring, "layers": list(range(1, num_layers + 1)),
                                     "phase": "synthetic", "task": f"synthetic-{seed}"})),
    }
    if router_logits:
        out["router_logits"] = z.astype(np.float16)
    if batch_size is not None:
        out["batch_ids"] = (np.arange(t) // batch_size).astype(np.int32)
    return out


def write_synthetic_trace(path: str | os.PathLike, **kwargs: Any) -> str:
    """Write :func:`synthetic_trace` to ``path`` (.npz); returns the path."""
    path = os.fspath(path)
    np.savez(path, **synthetic_trace(**kwargs))
    return path
