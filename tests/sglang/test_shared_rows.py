"""Attention DP over a TP MoE (no all-to-all backend): every TP rank routes the same gathered rows of the
whole DP group, so the routing hook must decide alike on every rank from facts they share (the group's
forward mode, the gathered rows), whatever each rank's own state (its local forward mode, its requests'
exact-routing flags, its local batch size). A property test over simulated ranks on SGLang's TopKConfig."""

import random

import pytest
import torch

from conftest import require_module
from xshare.selection import SelectorConfig
from xshare.sglang import layer
from xshare.sglang import state as rt
from xshare.sglang.settings import PluginSettings

topk = require_module("sglang.srt.layers.moe.topk", "scripts/install_sglang_cpu.sh")
from test_sglang_router_families import _cfg  # noqa: E402

POLICIES = ["xshare", "xshare_ep", "lynx", "des_vote", "oea", "xshare_spec"]


def _rank(policy: str, e: int, local: dict) -> rt.ProcessState:
    runtime = rt.ProcessState(PluginSettings(enabled=True, sim_gpus=4,
                                        selector=SelectorConfig(policy=policy, budget=max(4, e // 4), warmup_k=1)))
    runtime.scattered_input = False
    runtime.shared_rows = True  # what the plugin reads from SGLang: attention DP size > 1, no a2a backend
    runtime.push(rt.ForwardState(**local))
    return runtime


@pytest.mark.parametrize("family", ["deepseek_v3", "glm45", "deepseek_v2"])
@pytest.mark.parametrize("policy", POLICIES)
def test_ranks_sharing_rows_route_them_alike_whatever_their_local_state(family, policy):
    cfg, e, k = _cfg(family)
    rng = random.Random(sum(map(ord, family + policy)))
    from xshare.selection.routers.gate import reference_route
    from xshare.selection.routers.spec import RouterSpec

    spec = RouterSpec.from_topk_config(cfg)
    applied = 0
    for step in range(6):
        rows = rng.randint(4, 20)
        x = torch.randn(rows, e, generator=torch.Generator().manual_seed(step)) * 2
        own = reference_route(x, k, spec)
        args = {"topk_ids": own.topk_ids, "topk_weights": own.topk_weights, "router_logits": x, "layer_id": 2,
                "num_token_non_padded": None}
        locals_ = [  # what differs between the ranks of one DP group: their own batches
            dict(mode="decode", global_mode="decode", exact=torch.rand(3) < 0.5),
            dict(mode="idle", global_mode="decode"),
            dict(mode="decode", global_mode="decode", exact_unknown=True),
            dict(mode="decode", global_mode="decode", exact=torch.zeros(rows - 1, dtype=torch.bool)),
        ]
        outs = [layer.route(_rank(policy, e, local), dict(args), cfg) for local in locals_]
        first = outs[0]
        assert first is not None
        applied += 1
        for out in outs[1:]:
            assert out is not None and torch.equal(out["topk_ids"], first["topk_ids"])
            assert torch.equal(out["topk_weights"], first["topk_weights"])
        # a DP group in prefill leaves the call to SGLang on every rank, whatever a rank's own mode
        idle = [layer.route(_rank(policy, e, dict(mode=m, global_mode="extend")), dict(args), cfg)
                for m in ("decode", "idle")]
        assert idle == [None, None]
    assert applied == 6
