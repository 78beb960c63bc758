"""The tiny models of the other router families (``xshare.models.tiny_moe.PRESETS``): their router configs,
deterministic builds with a correction bias that changes routing, the Qwen3-MoE default left as it was, and
``xshare tiny-model --arch``. Served for real by tests/e2e/test_sglang_e2e_routers.py."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from conftest import require_module
from xshare.models.architecture import MODEL_CLASSES
from xshare.models.tiny_moe import (
    PRESETS,
    TinyGlm4MoeSpec,
    TinyMixtralSpec,
    TinyMoeSpec,
    build_tiny_moe,
    model_config,
    preset,
    read_manifest,
)

require_module("transformers", "scripts/install_sglang_cpu.sh")

#: The router of each preset, as its Hugging Face config states it.
ROUTERS = {
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "num_local_experts": 16, "num_experts_per_tok": 4,
                  "norm_topk_prob": True, "num_hidden_layers": 2},
    "glm45": {"architectures": ["Glm4MoeForCausalLM"], "n_routed_experts": 16, "num_experts_per_tok": 4,
              "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
              "n_shared_experts": 1, "first_k_dense_replace": 1, "num_hidden_layers": 3,
              "num_nextn_predict_layers": 0},
    "deepseek_v3_router": {"architectures": ["Glm4MoeForCausalLM"], "n_routed_experts": 32, "num_experts_per_tok": 4,
                           "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                           "n_shared_experts": 1, "first_k_dense_replace": 1, "num_hidden_layers": 3,
                           "num_nextn_predict_layers": 0},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "num_local_experts": 8, "num_experts_per_tok": 2,
                "intermediate_size": 32, "num_hidden_layers": 2, "sliding_window": None},
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_router_configs(name):
    spec = PRESETS[name]
    cfg = model_config(spec, 1024, 0)
    want = dict(ROUTERS[name])
    assert cfg.model_type == spec.arch and [MODEL_CLASSES[cfg.model_type]] == want.pop("architectures")
    got = cfg.to_dict()
    assert {k: got[k] for k in want} == want
    assert got["tie_word_embeddings"] is False


def test_moe_layers():
    assert PRESETS["qwen3_moe"].moe_layers == (0, 1)
    assert PRESETS["glm45"].moe_layers == PRESETS["deepseek_v3_router"].moe_layers == (1, 2)
    assert PRESETS["mixtral"].moe_layers == (0, 1)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_experts": 30, "n_group": 8}, "multiple of n_group"),
    ({"num_experts": 8, "n_group": 8}, "needs >= 2 experts"),
    ({"n_group": 4, "topk_group": 5}, "exceeds n_group"),
    ({"num_experts": 16, "n_group": 8, "topk_group": 1, "top_k": 4}, "exceeds the 2 experts"),
    ({"first_k_dense_replace": 3}, "first_k_dense_replace"),
    ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
    ({"bias_scale": -1.0}, "bias_scale"),
    ({"norm_topk_prob": 1}, "norm_topk_prob"),
])
def test_glm_spec_rejects_what_sglang_cannot_route(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TinyGlm4MoeSpec(**kwargs)


def test_preset_overrides():
    assert preset("deepseek_v3_router", seed=3) == TinyGlm4MoeSpec(num_experts=32, n_group=8, topk_group=4, seed=3)
    with pytest.raises(ValueError, match="not a setting of the mixtral"):
        preset("mixtral", n_group=2)
    with pytest.raises(ValueError, match="unknown tiny model"):
        preset("deepseek_v3")


def test_glm_builds_are_deterministic_and_the_bias_changes_routing(tmp_path):
    torch = require_module("torch")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    spec = PRESETS["deepseek_v3_router"]
    a = build_tiny_moe(tmp_path / "a", spec)
    b = build_tiny_moe(tmp_path / "b", spec)
    ma = read_manifest(a)
    assert ma == read_manifest(b) and ma["arch"] == "glm4_moe" and ma["spec"] == asdict(spec)
    with safe_open(str(a / "model.safetensors"), "pt") as f:
        biases = {k: f.get_tensor(k) for k in f.keys() if k.endswith("e_score_correction_bias")}
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    assert sorted(biases) == [f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in spec.moe_layers]
    for bias in biases.values():
        assert bias.dtype == torch.float32 and bias.shape == (spec.num_experts,)
        assert 0.5 * spec.bias_scale < float(bias.std()) < 2 * spec.bias_scale
    assert not torch.equal(*biases.values())
    model = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(256, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    _, weights, ids = gate(x)
    saved = gate.e_score_correction_bias.clone()
    gate.e_score_correction_bias.zero_()
    _, _, ids0 = gate(x)
    gate.e_score_correction_bias.copy_(saved)
    changed = (ids.sort(1).values != ids0.sort(1).values).any(1).float().mean().item()
    assert changed > 0.25, changed  # the bias really moves experts in and out of the top-k
    assert torch.allclose(weights.sum(1), torch.full((256,), spec.routed_scaling_factor))
    # the picks stay inside topk_group of the n_group groups
    groups = ids // (spec.num_experts // spec.n_group)
    assert max(len(set(row.tolist())) for row in groups) <= spec.topk_group


def test_qwen_default_is_unchanged_and_another_arch_rebuilds_its_directory(tmp_path):
    d = build_tiny_moe(tmp_path / "m")
    man = read_manifest(d)
    assert set(man) == {"spec", "files"} and man["spec"] == asdict(TinyMoeSpec())  # no "arch": the old manifest
    same_fields = TinyMixtralSpec(num_experts=16, top_k=4)
    assert asdict(same_fields) == asdict(TinyMoeSpec())
    build_tiny_moe(d, same_fields)  # same fields, another architecture: rebuilt, not reused
    assert json.loads((d / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    assert read_manifest(d)["arch"] == "mixtral"


def test_cli_arch(tmp_path, capsys):
    from xshare.cli import main

    assert main(["tiny-model", str(tmp_path / "g"), "--arch", "glm45", "--norm-topk-prob", "false",
                 "--num-layers", "2"]) == 0
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["architectures"] == ["Glm4MoeForCausalLM"] and cfg["norm_topk_prob"] is False
    assert cfg["num_hidden_layers"] == 2 and cfg["n_group"] == 1
    assert main(["tiny-model", str(tmp_path / "x"), "--arch", "mixtral", "--topk-group", "2"]) == 2
    assert "topk_group: not a setting of the mixtral architecture" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
