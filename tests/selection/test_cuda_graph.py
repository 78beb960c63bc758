"""The selector inside a captured CUDA graph follows knob changes made in place, without recapture.

Needs a CUDA device (skipped otherwise; the CPU-side proof that the hot path never synchronises is
tests/selection/test_no_host_sync.py). Both the torch path (``select``) and the fused Triton kernel
(``select(backend="triton")``) are captured: static input buffers, a device ``num_tokens`` and ``SelectorKnobs``;
each knob change and each new batch is written in place, the graph replayed, and the result compared
with an eager call on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from xshare.selection import Placement, SelectorConfig, SelectorKnobs, select
from xshare.selection.backends.triton.route import triton_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

T, E, TOP_K = 16, 128, 8

BACKENDS = ["torch"] + (["triton"] if triton_available() else [])


def _run(backend: str, **kw):
    if backend == "torch":
        return select(**kw)
    return select(**kw, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["xshare", "xshare_ep"])
def test_captured_selector_follows_in_place_knob_changes(backend, policy):
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    base = SelectorConfig(policy=policy, budget=32, warmup_k=1)
    knobs = SelectorKnobs.create(base, E, TOP_K, device)
    placement = Placement.contiguous(E, 4).to(device) if policy == "xshare_ep" else None
    logits = torch.randn(T, E, device=device, generator=gen)
    num_tokens = torch.tensor(T, device=device)
    kw = {"router_logits": logits, "top_k": TOP_K, "config": base, "placement": placement,
          "num_tokens": num_tokens, "knobs": knobs, "validate": False}

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: compiles the kernels, fills the allocator pools
            _run(backend, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _run(backend, **kw)

    distinct = set()
    changes = [({}, True), ({"budget": 8}, True), ({"budget": 8, "warmup_k": 0}, True), ({"gpu_cap": 2}, True),
               ({}, False), ({"min_tokens": 20}, True), ({"budget": 1.0}, True)]
    for step, (change, enabled) in enumerate(changes):
        knobs.update(base.replace(**change), enabled=enabled)
        logits.copy_(torch.randn(T, E, device=device, generator=gen))  # a new batch, same buffer
        num_tokens.fill_(T - step)  # fewer real tokens: the rest is padding
        graph.replay()
        eager = _run(backend, **kw)
        reference = select(**kw)
        torch.cuda.synchronize()
        assert torch.equal(captured.topk_ids, eager.topk_ids)
        assert torch.equal(captured.active, eager.active)
        torch.testing.assert_close(captured.topk_weights, eager.topk_weights, atol=1e-6, rtol=0)
        # and the captured selector is the policy (the kernel may differ from torch only on sub-ulp near-ties)
        assert (captured.topk_ids == reference.topk_ids).float().mean() > 0.99
        distinct.add(int(captured.active.sum()))
    assert len(distinct) >= 3  # the replays really followed the knobs
