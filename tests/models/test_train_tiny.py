"""The tiny MoE model: tokenizer, config, deterministic training, save/load, offline evaluation with
a routing override (HF transformers, greedy), profiling. Small configs, so the whole file is fast."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import require_module

require_module("transformers", "scripts/install_sglang_cpu.sh")
require_module("tokenizers", "scripts/install_sglang_cpu.sh")

from xshare.models import cache  # noqa: E402
from xshare.models import tasks as T  # noqa: E402
from xshare.models.cache import AUXFREE_DIR_ENV, CACHE_ENV, MODEL_DIR_ENV, default_model_dir, ensure_model  # noqa: E402
from xshare.models.config import AuxFreeConfig, TinyConfig, build_model, config_from_dict  # noqa: E402
from xshare.models.decode import greedy_decode  # noqa: E402
from xshare.models.evaluation import evaluate, task_specialisation  # noqa: E402
from xshare.models.experts import _TRAIN_TOKEN_MASK, SORTED_EXPERTS, experts_implementation, skip_padding  # noqa: E402
from xshare.models.profiling import profile_decode  # noqa: E402
from xshare.models.routing_override import RoutingOverride, moe_blocks  # noqa: E402
from xshare.models.store import (  # noqa: E402
    MANIFEST,
    WEIGHTS,
    load,
    model_intact,
    read_manifest,
    save,
    state_sha256,
)
from xshare.models.tokenizer import build_tokenizer, training_batch  # noqa: E402
from xshare.models.training import (  # noqa: E402
    BiasBalancer,
    expert_load,
    load_imbalance,
    train,
    update_correction_bias,
)
from xshare.selection import SelectorConfig  # noqa: E402

SMALL = TinyConfig(hidden_size=32, head_dim=8, num_heads=4, num_kv_heads=2, num_layers=2, num_experts=8,
                      top_k=2, moe_intermediate_size=32, steps=6, batch_size=8, warmup_steps=2, threads=1)
#: The aux-loss-free model's router in small: 16 experts in 4 groups of 4, 2 groups kept, top-4.
SMALL_AUXFREE = AuxFreeConfig(hidden_size=32, head_dim=8, num_heads=4, num_kv_heads=2, num_layers=2, num_experts=16,
                              n_group=4, topk_group=2, top_k=4, moe_intermediate_size=32, steps=6, batch_size=8,
                              warmup_steps=2, threads=1, bias_update_speed=0.01)
#: The shipped Qwen3-MoE model's identity: its cache directory ``tiny-moe-02728698c60d`` must stay valid.
QWEN3_IDENTITY = "02728698c60d"


def _decisive_random_model(cfg: TinyConfig = SMALL, seed: int = 0):
    """A random model whose greedy tokens are far from ties (large output logits) and vary."""
    model = build_model(cfg.replace(seed=seed))
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)
        for block in moe_blocks(model):
            block.gate.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
            block.experts.down_proj.mul_(50.0)
    return model.eval()


# -- tokenizer ------------------------------------------------------------------------------------
def test_tokenizer_round_trip_one_token_per_character(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    assert [tok.convert_ids_to_tokens(i) for i in range(4)] == list(T.SPECIALS)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "".join(T.ALPHABET)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == list(range(4, 4 + len(T.ALPHABET)))
    assert tok.decode(ids) == text
    assert tok.decode([*tok.encode("A:12+3=", add_special_tokens=False), tok.eos_token_id]) == "A:12+3=<eos>"
    assert tok.decode([*tok.encode("A:12+3=", add_special_tokens=False), tok.eos_token_id],
                      skip_special_tokens=True) == "A:12+3="
    assert tok.encode("?", add_special_tokens=False) == [3]  # unknown character -> <unk>
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(text, add_special_tokens=False) == ids  # SGLang loads it like this
    assert again.eos_token == T.EOS and again.pad_token == T.PAD


def test_training_batch_masks_prompt_and_padding():
    tok = build_tokenizer()
    probs = [T.Problem("add", "A:1+2=", "3"), T.Problem("copy", "C:abcd=", "abcd")]
    b = training_batch(tok, probs)
    assert b["input_ids"].shape == (2, 12)
    assert b["attention_mask"].sum(1).tolist() == [8, 12]
    assert tok.decode(b["labels"][0][b["labels"][0] >= 0]) == "3<eos>"
    assert tok.decode(b["labels"][1][b["labels"][1] >= 0]) == "abcd<eos>"
    assert (b["labels"][0, 8:] == -100).all()


# -- config ---------------------------------------------------------------------------------------
def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="top_k"):
        TinyConfig(num_experts=4, top_k=8)
    with pytest.raises(ValueError, match="hidden_size"):
        TinyConfig(hidden_size=0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        TinyConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="lr"):
        TinyConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        TinyConfig(max_position_embeddings=8)
    with pytest.raises(ValueError, match="unknown task"):
        TinyConfig(tasks=("add", "nope"))
    with pytest.raises(ValueError, match="unknown TinyConfig key"):
        TinyConfig.from_dict({"hidden": 3})
    cfg = TinyConfig()
    assert TinyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.identity() == TinyConfig().identity()
    assert cfg.identity() != cfg.replace(seed=1).identity()


def test_default_model_is_sized_for_expert_dominated_decode():
    cfg = TinyConfig()
    model = build_model(cfg.replace(steps=1))
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert experts / total > 0.9  # expert weights dominate the parameters (and the bytes read per decode step)
    assert model.config.num_experts == cfg.num_experts and model.config.num_experts_per_tok == cfg.top_k


def test_auxfree_config_has_its_own_identity_and_leaves_the_first_models_unchanged(monkeypatch, tmp_path):
    assert TinyConfig().identity() == QWEN3_IDENTITY and "arch" not in TinyConfig().to_dict()
    cfg = AuxFreeConfig()
    assert cfg.to_dict()["arch"] == "glm4_moe" and cfg.identity() != QWEN3_IDENTITY
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert config_from_dict(TinyConfig().to_dict()) == TinyConfig()
    assert cfg.replace(steps=7).identity() != cfg.identity() and isinstance(cfg.replace(steps=7), AuxFreeConfig)
    assert cfg.moe_layers == (0, 1, 2) and cfg.router_aux_loss_coef == 0
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path / "qwen3"))  # the first model's variable does not apply
    monkeypatch.delenv(AUXFREE_DIR_ENV, raising=False)
    assert default_model_dir(cfg) == tmp_path / f"tiny-auxfree-{cfg.identity()}"
    monkeypatch.setenv(AUXFREE_DIR_ENV, str(tmp_path / "af"))
    assert default_model_dir(cfg) == tmp_path / "af" and default_model_dir() == tmp_path / "qwen3"
    for bad, field in (({"router_aux_loss_coef": 0.01}, "router_aux_loss_coef"), ({"n_group": 5}, "n_group"),
                       ({"topk_group": 9}, "topk_group"), ({"top_k": 12, "topk_group": 1}, "top_k"),
                       ({"bias_update_speed": -1.0}, "bias_update_speed"),
                       ({"first_k_dense_replace": 3}, "first_k_dense_replace")):
        with pytest.raises(ValueError, match=field):
            AuxFreeConfig(**bad)
    with pytest.raises(ValueError, match="AuxFreeConfig"):
        AuxFreeConfig.from_dict({**cfg.to_dict(), "arch": "qwen3_moe"})


def test_auxfree_model_is_glm45_with_deepseek_v3_router():
    model = build_model(AuxFreeConfig(steps=1))
    c = model.config
    assert type(model).__name__ == "Glm4MoeForCausalLM"
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (32, 4, 8, 4)
    assert c.routed_scaling_factor == 2.5 and c.norm_topk_prob and c.n_shared_experts == 1
    blocks = moe_blocks(model)
    assert len(blocks) == 3
    for block in blocks:  # the correction bias: a float32 buffer at 0, never a parameter
        bias = block.gate.e_score_correction_bias
        assert bias.dtype == torch.float32 and not bias.requires_grad and bool((bias == 0).all())
    assert not any("e_score_correction_bias" in n for n, _ in model.named_parameters())


# -- aux-loss-free balancing ----------------------------------------------------------------------
def test_bias_update_rule_is_deepseek_v3s():
    bias = torch.tensor([0.0, 0.5, -0.25, 0.0])
    load = torch.tensor([10, 2, 4, 4])  # mean 5
    out = update_correction_bias(bias, load, 0.1)
    torch.testing.assert_close(out, torch.tensor([-0.1, 0.6, -0.15, 0.1]))
    torch.testing.assert_close(update_correction_bias(bias, torch.tensor([3, 3, 3, 3]), 0.1), bias)  # balanced
    ids = torch.tensor([[0, 1], [0, 2], [3, 0]])
    assert expert_load(ids, 5).tolist() == [3, 1, 1, 1, 0]
    assert expert_load(ids, 5, torch.tensor([True, False, True])).tolist() == [2, 1, 0, 1, 0]
    assert load_imbalance(torch.tensor([4, 4, 4])) == 1.0 and load_imbalance(torch.tensor([8, 2, 2])) == 2.0


def test_bias_updates_balance_a_skewed_router_without_touching_its_weights():
    """A router whose affinities favour a few experts: repeated bias updates on its own routing balance the
    loads; the routed weights stay the unbiased affinities of the chosen experts, renormalised, x2.5."""
    model = build_model(SMALL_AUXFREE)
    gate = moe_blocks(model)[0].gate
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.normal_(0, 1.0, generator=gen)
    x = torch.randn(256, SMALL_AUXFREE.hidden_size, generator=gen)
    x[:, 0] += 2.0  # a shared direction: some experts win for most tokens
    with torch.no_grad():
        gate.weight[:, 0] = torch.linspace(-3.0, 3.0, SMALL_AUXFREE.num_experts)
        logits0, _, ids0 = gate(x)
        start = load_imbalance(expert_load(ids0, 16))
        for _ in range(300):
            _, _, ids = gate(x)
            gate.e_score_correction_bias.copy_(update_correction_bias(gate.e_score_correction_bias,
                                                                      expert_load(ids, 16), 0.01))
        logits, weights, ids = gate(x)
    end = load_imbalance(expert_load(ids, 16))
    assert start > 2.0 and end < 1.5 and end < 0.6 * start, (start, end)
    torch.testing.assert_close(logits, logits0)  # the bias never changes the affinities ...
    assert bool((ids != ids0).any())  # ... only which experts are chosen
    aff = torch.sigmoid(logits).gather(1, ids)
    torch.testing.assert_close(weights, aff / aff.sum(1, keepdim=True) * 2.5)


def test_auxfree_training_balances_with_the_bias_and_no_aux_loss():
    """The trainer: the loss is the answer loss alone (no auxiliary term), the optimiser never sees the bias,
    the bias moves by exactly the speed per step, the balancer counts real tokens only."""
    import itertools

    cfg = SMALL_AUXFREE
    res = train(cfg)
    for block in moe_blocks(res.model):
        bias = block.gate.e_score_correction_bias
        steps_moved = bias / cfg.bias_update_speed
        assert bool((bias != 0).any())
        # each step moves every bias by -speed, 0 or +speed: a whole number of steps within |steps| <= 6
        torch.testing.assert_close(steps_moved, steps_moved.round(), atol=1e-4, rtol=0)
        assert float(steps_moved.abs().max()) <= cfg.steps + 1e-4
    assert len(res.aux_losses) == 1 and res.aux_losses[0] >= 1.0  # max/mean load, not a loss
    # the model's loss on a batch is exactly the cross-entropy of the answer tokens
    tok = build_tokenizer()
    batch = training_batch(tok, list(itertools.islice(T.training_problems(0, cfg.tasks, {}), 8)))
    with torch.no_grad():
        out = res.model(**batch, use_cache=False)
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        ce = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ce)
    assert getattr(out, "aux_loss", None) is None
    # the balancer counts only the real tokens of a padded batch
    model = build_model(cfg)
    bal = BiasBalancer(model, 0.01)
    model.train()
    mask = batch["attention_mask"].reshape(-1).bool()
    bal.valid = mask
    with torch.no_grad():
        model(**batch, use_cache=False)
    assert [int(load.sum()) for load in bal.loads] == [int(mask.sum()) * cfg.top_k] * cfg.num_layers
    bal.step()
    assert all(load is None for load in bal.loads)
    bal.close()


def test_auxfree_training_is_bit_for_bit_reproducible(tmp_path):
    a = train(SMALL_AUXFREE)
    b = train(SMALL_AUXFREE)
    assert state_sha256(a.model) == state_sha256(b.model)  # the biases (buffers) included
    assert state_sha256(a.model) != state_sha256(train(SMALL_AUXFREE.replace(bias_update_speed=0.0)).model)
    d = save(a, SMALL_AUXFREE, tmp_path / "m")
    assert model_intact(d, SMALL_AUXFREE) and not model_intact(d, SMALL_AUXFREE.replace(seed=3))
    man = read_manifest(d)
    assert man["config"]["arch"] == "glm4_moe" and man["identity"] == SMALL_AUXFREE.identity()
    assert json.loads((d / "config.json").read_text())["architectures"] == ["Glm4MoeForCausalLM"]
    model, _ = load(d)
    assert state_sha256(model) == man["state_sha256"]
    torch.testing.assert_close(moe_blocks(model)[1].gate.e_score_correction_bias,
                               moe_blocks(a.model)[1].gate.e_score_correction_bias, rtol=0, atol=0)


def test_override_on_the_auxfree_router_keeps_its_routing_and_limits_experts():
    """Offline evaluation of the DeepSeek-V3 router: off and topk route as the model's own gate (bias and
    groups); xshare at a budget activates fewer experts on the live rows."""
    model = build_model(SMALL_AUXFREE)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)
        for block in moe_blocks(model):
            block.gate.weight.normal_(0, 1.0, generator=gen)
            block.gate.e_score_correction_bias.normal_(0, 0.1, generator=gen)
            block.experts.down_proj.mul_(50.0)
    model.eval()
    tok = build_tokenizer()
    probs = T.heldout(10, seed=6)
    off = evaluate(model, tok, probs, batch_size=10, return_texts=True)
    topk = evaluate(model, tok, probs, batch_size=10, selector=SelectorConfig("topk"), return_texts=True)
    assert off["texts"] == topk["texts"] and len(set(off["texts"])) > 1
    assert topk["decode"]["activated"] == off["decode"]["activated"] == off["decode"]["vanilla"]
    on = evaluate(model, tok, probs, batch_size=10, selector=SelectorConfig("xshare", budget=6, warmup_k=0))
    assert on["decode"]["activated"] < on["decode"]["vanilla"]
    assert on["prefill"]["activated"] == on["prefill"]["vanilla"]


# -- training -------------------------------------------------------------------------------------
def test_short_training_is_bit_for_bit_reproducible():
    a = train(SMALL)
    b = train(SMALL)
    c = train(SMALL.replace(seed=1))
    assert state_sha256(a.model) == state_sha256(b.model)
    assert state_sha256(a.model) != state_sha256(c.model)
    assert state_sha256(a.model) != state_sha256(build_model(SMALL))  # it did train
    assert len(a.losses) == 1 and a.losses == b.losses


def test_sorted_experts_match_the_library_loop():
    model = _decisive_random_model()
    block = moe_blocks(model)[0]
    x = torch.randn(37, SMALL.hidden_size, generator=torch.Generator().manual_seed(0))
    _, w, idx = block.gate(x)
    with experts_implementation(model, "eager"):
        ref = block.experts(x, idx, w)
    with experts_implementation(model, SORTED_EXPERTS):
        got = block.experts(x, idx, w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_padding_rows_skip_the_experts_without_changing_loss_or_gradients():
    """Right padding + causal attention + no labels on padding: the skip only drops wasted work."""
    import itertools

    from xshare.models import tasks as T

    model = _decisive_random_model()
    tok = build_tokenizer()
    problems = list(itertools.islice(T.training_problems(0, SMALL.tasks, {}), 12))
    batch = training_batch(tok, problems)
    assert (batch["attention_mask"] == 0).any()  # the batch does hold padding

    def loss_and_grads(skip):
        model.zero_grad(set_to_none=True)
        with experts_implementation(model, SORTED_EXPERTS):
            if skip:
                with skip_padding(batch["attention_mask"]):
                    out = model(**batch, output_router_logits=True, use_cache=False)
            else:
                out = model(**batch, output_router_logits=True, use_cache=False)
            out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full_loss, full = loss_and_grads(False)
    skip_loss, skipped = loss_and_grads(True)
    torch.testing.assert_close(skip_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert full.keys() == skipped.keys()
    for name in full:
        torch.testing.assert_close(skipped[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    assert _TRAIN_TOKEN_MASK[0] is None  # the mask never outlives the block


def test_training_learns():
    """60 steps on addition: the answer loss falls well below its start (answers are digits)."""
    cfg = SMALL.replace(steps=60, batch_size=16, lr=1e-2, warmup_steps=10, tasks=["add"])
    res = train(cfg, log_every=20)
    assert len(res.losses) == 3
    assert res.losses[-1] < 0.75 * res.losses[0]


# -- save / load / ensure -------------------------------------------------------------------------
def test_save_load_and_intact_check(tmp_path):
    from safetensors import safe_open

    res = train(SMALL)
    d = save(res, SMALL, tmp_path / "m")
    assert model_intact(d, SMALL) and not model_intact(d, SMALL.replace(seed=5))
    man = read_manifest(d)
    assert man["state_sha256"] == state_sha256(res.model)
    assert man["weights_sha256"] == hashlib.sha256((d / WEIGHTS).read_bytes()).hexdigest()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["eos_token_id"] == 2
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == 2
    with safe_open(str(d / WEIGHTS), "pt") as f:  # per-expert weights, the layout SGLang loads
        assert "model.layers.0.mlp.experts.7.gate_proj.weight" in f.keys()
    model, tok = load(d)
    assert state_sha256(model) == man["state_sha256"]
    assert tok.padding_side == "left"
    # a damaged file is detected
    with open(d / WEIGHTS, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\1")
    assert not model_intact(d)


def test_ensure_model_trains_once_then_loads(tmp_path, monkeypatch):
    cfg = SMALL.replace(steps=3)
    d = ensure_model(tmp_path / "m", cfg, log=None, eval_problems=10)
    man = read_manifest(d)
    assert man["heldout"]["problems"] == 10 and 0.0 <= man["heldout"]["accuracy"]["overall"] <= 1.0
    calls = []
    monkeypatch.setattr(cache, "train", lambda *a, **k: calls.append(1))
    assert ensure_model(d, cfg, log=None) == d and not calls  # loaded, not retrained
    other = tmp_path / "foreign"
    other.mkdir()
    (other / "x.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="refusing"):
        ensure_model(other, cfg, log=None)
    assert (other / "x.txt").read_text() == "not a model"


def test_default_model_dir_uses_env(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
    assert default_model_dir() == tmp_path / f"tiny-moe-{TinyConfig().identity()}"
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path / "x"))
    assert default_model_dir() == tmp_path / "x"


# -- offline evaluation ---------------------------------------------------------------------------
def test_greedy_decode_matches_transformers_generate():
    model = _decisive_random_model()
    tok = build_tokenizer()
    probs = T.heldout(10, seed=2)
    enc = tok([p.prompt for p in probs], return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    ref = [tok.decode(x[enc.input_ids.shape[1]:], skip_special_tokens=True) for x in out]
    mine = greedy_decode(model, tok, [p.prompt for p in probs], max_new_tokens=6)
    assert [tok.decode(g, skip_special_tokens=True) for g in mine] == ref
    assert len({r for r in ref}) > 1  # the check is not vacuous


def test_left_padding_and_batching_do_not_change_vanilla_outputs():
    model = _decisive_random_model()
    tok = build_tokenizer()
    probs = T.heldout(10, seed=5)
    one = evaluate(model, tok, probs, batch_size=1, return_texts=True)
    many = evaluate(model, tok, probs, batch_size=5, return_texts=True)
    assert one["texts"] == many["texts"]
    assert one["decode"]["mean_rows"] == 1.0 and many["decode"]["mean_rows"] > 1.0


def test_topk_selector_reproduces_the_model_routing():
    model = _decisive_random_model()
    tok = build_tokenizer()
    probs = T.heldout(10, seed=6)
    off = evaluate(model, tok, probs, batch_size=10, return_texts=True)
    topk = evaluate(model, tok, probs, batch_size=10, selector=SelectorConfig("topk"), return_texts=True)
    assert off["texts"] == topk["texts"]
    assert topk["decode"]["activated"] == topk["decode"]["vanilla"] == off["decode"]["activated"]


def test_xshare_override_limits_activated_experts_on_live_rows():
    model = _decisive_random_model()
    tok = build_tokenizer()
    probs = T.heldout(10, seed=7)
    off = evaluate(model, tok, probs, batch_size=10, return_texts=True)
    sel = SelectorConfig("xshare", budget=2, warmup_k=0)
    on = evaluate(model, tok, probs, batch_size=10, selector=sel, return_texts=True)
    assert off["decode"]["vanilla"] > 2
    assert on["decode"]["activated_per_layer"] == [2.0] * SMALL.num_layers  # exactly the budget, every step
    assert on["decode"]["vanilla"] > on["decode"]["activated"]
    assert on["texts"] != off["texts"]  # the override reaches the experts
    assert on["prefill"]["activated"] == on["prefill"]["vanilla"]  # prefill untouched by default
    pre = evaluate(model, tok, probs, batch_size=10, selector=sel, select_prefill=True)
    assert pre["prefill"]["activated"] == 2.0


def test_finished_rows_do_not_count():
    model = _decisive_random_model()
    with RoutingOverride(model, SelectorConfig("xshare", budget=2, warmup_k=0)) as ov:
        rows = torch.arange(4)
        live = torch.tensor([True, False, True, False])
        ov.begin_forward("decode", live, rows, torch.zeros(4, dtype=torch.long))
        x = torch.randn(4, 1, SMALL.hidden_size, generator=torch.Generator().manual_seed(3))
        block = moe_blocks(model)[0]
        y = block(x)
        active, vanilla, rows_counted = ov.records["decode"][-1][0]
        assert rows_counted == 2 and active == 2 and vanilla <= 2 * SMALL.top_k
        # the finished rows do not influence the live rows: same result as a batch of the live rows only
        ov.begin_forward("decode", torch.ones(2, dtype=torch.bool), torch.arange(2), torch.zeros(2, dtype=torch.long))
        torch.testing.assert_close(block(x[live]), y[live])
    assert "forward" not in vars(moe_blocks(model)[0].gate)  # the override is removed on exit


def test_task_specialisation_summary():
    usage = [[[10, 0, 0, 0], [0, 0, 5, 5]], [[1, 1, 1, 1], [1, 1, 1, 1]]]
    s = task_specialisation(usage, tasks=("a", "b"))
    assert s["layers"][0]["mean_tv_distance"] == 1.0
    assert s["layers"][1]["mean_tv_distance"] == 0.0
    assert s["layers"][0]["top_experts"]["a"][0] == 0
    assert s["layers"][0]["experts_for_90pct"] == {"a": 1, "b": 2}


def test_profile_decode_reports_a_share():
    model = _decisive_random_model()
    tok = build_tokenizer()
    r = profile_decode(model, tok, T.heldout(8, seed=1), steps=3, repeats=1)
    assert 0.0 < r["moe_share"] < 1.0 and r["moe_ms"] < r["step_ms"]


# -- the trained model (cached by `make test`'s set-up; trained here if missing: ~15 min on 2 cores) ----
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_trained_model_reaches_90_percent_on_heldout():
    d = ensure_model()
    model, tok = load(d)
    probs = T.heldout(100, seed=11)
    res = evaluate(model, tok, probs)
    assert res["accuracy"]["overall"] >= 0.9, res["accuracy"]
    assert Path(d, MANIFEST).is_file()
