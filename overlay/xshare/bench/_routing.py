"""Synthetic router logits with the routing statistics of the ESFT traces, for any (E, top_k).

The traces (``../shared/traces``, DeepSeek-V2-Lite, 64 experts, top-6) cannot travel with the
repository to a GPU machine and were not recorded on the 128- and 256-expert layers the GPU check
and the cost model need. What they say about batching is one curve: decode-like batches of B
requests activate fewer distinct experts than uniform routing would (ratio 0.93 at B = 4, 0.85 at
B = 16, 0.84 at B = 32: requests in a batch share preferences). ``_trace_routing.STATS`` holds
that curve (``scripts/trace_routing_stats.py`` measures it).

The generator: ``logits[b, t, e] = z[b, t, e] + sigma * u[b, e]`` with z, u standard normal, i.e.
each token's own preferences plus a preference shared by the whole batch; ``sigma`` is fitted per
(E, top_k) so that the expected activation at B = 16 over the uniform one equals the traces' ratio
(bisection on common random numbers: deterministic). On the traces' own shape (64, 6) this one
parameter reproduces their ratio within 1% at B = 4, 8, 16 and 4% at B = 32; at B = 64 it
overestimates activation by 12% (the traces saturate: some experts are rarely used by any task).
``sigma = 0`` is uniform routing (every token's top-k a uniformly random subset).

Needs torch only (the GPU check imports this module).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from xshare.bench._trace_routing import STATS

FIT_BATCH = 16
_FIT_SAMPLES = 400


def trace_ratio(batch: int) -> float:
    """The traces' activation ratio (vanilla / uniform) at ``batch`` (interpolated between the
    measured batch sizes, log-linear in B; 1 at B = 1; the last value beyond B = 64)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    pts = sorted((int(b), float(v["ratio"])) for b, v in STATS["per_batch"].items())
    if batch >= pts[-1][0]:
        return pts[-1][1]
    for (b0, r0), (b1, r1) in zip(pts, pts[1:], strict=False):
        if b0 <= batch <= b1:
            w = (math.log(batch) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return r0 + w * (r1 - r0)
    return pts[0][1]


def uniform_active(num_experts: int, top_k: int, batch: int) -> float:
    """E * (1 - (1 - k/E)^B): expected distinct experts under uniform routing."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def _draws(num_experts: int, batch: int, samples: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, batch, num_experts, generator=gen), torch.randn(samples, 1, num_experts, generator=gen)


def _mean_active(z: Tensor, u: Tensor, top_k: int, sigma: float) -> float:
    samples, _, num_experts = z.shape
    ids = (z + sigma * u).topk(top_k, dim=-1).indices.reshape(samples, -1)
    hit = torch.zeros(samples, num_experts).scatter_(1, ids, 1.0)
    return float(hit.sum(1).mean())


@functools.lru_cache(maxsize=64)
def fit_sigma(num_experts: int, top_k: int, ratio: float | None = None, batch: int = FIT_BATCH) -> float:
    """The shared-preference scale whose expected activation at ``batch`` is ``ratio`` x uniform
    (default: the traces' ratio at that batch). Deterministic."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts = {num_experts}], got {top_k}")
    target = trace_ratio(batch) if ratio is None else float(ratio)
    if not 0 < target <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {target}")
    uni = uniform_active(num_experts, top_k, batch)
    if target >= 1 or top_k == num_experts:
        return 0.0
    z, u = _draws(num_experts, batch, _FIT_SAMPLES, 1234)  # common random numbers: monotone in sigma
    lo, hi = 0.0, 4.0
    for _ in range(16):
        mid = 0.5 * (lo + hi)
        if _mean_active(z, u, top_k, mid) / uni > target:
            lo = mid
        else:
            hi = mid
    return round(0.5 * (lo + hi), 4)


def synthetic_logits(num_batches: int, batch: int, num_experts: int, *, sigma: float, seed: int = 0,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """Router logits float [num_batches, batch, num_experts]: each token's N(0, 1) preferences plus a
    per-batch shared N(0, sigma^2) preference per expert (sigma from :func:`fit_sigma`; 0 = uniform).
    Drawn on the CPU from ``seed`` (the same numbers on every device), then moved."""
    if num_batches < 1 or batch < 1 or num_experts < 1:
        raise ValueError("num_batches, batch and num_experts must be >= 1")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num_batches, batch, num_experts, generator=gen)
    u = torch.randn(num_batches, 1, num_experts, generator=gen)
    return (z + sigma * u).to(device=device, dtype=dtype)
