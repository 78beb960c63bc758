"""The roofline cost model of ``xshare eval``."""

import numpy as np
import pytest

from xshare.eval.costmodel import GPUS, MODELS, CostModel, match_model


def test_single_gpu_layer_time_is_the_roofline():
    m = MODELS["deepseek-v2-lite"]
    cm = CostModel(GPUS["h100"], m, num_gpus=1, hbm_efficiency=1.0, flops_efficiency=1.0)
    t = cm.layer_times(np.array([[10.0]]), np.array([[24.0]]), np.zeros((1, 1)), np.zeros((1, 1)), np.array([4]))
    per_expert = 3 * 2048 * 1408
    memory = (10 + 2) * per_expert * 2.0 / 3.35e12  # 10 routed + 2 shared experts, BF16
    compute = (2 * per_expert * 24 + 2 * 2 * per_expert * 4) / 989e12
    assert t[0] == pytest.approx(max(memory, compute))
    assert memory > compute  # decode at small batch is memory-bound


def test_compute_bound_when_tokens_dominate():
    cm = CostModel(GPUS["h200"], MODELS["qwen3-30b-a3b"], num_gpus=1, hbm_efficiency=1.0, flops_efficiency=1.0)
    pe = 3 * 2048 * 768
    t = cm.layer_times(np.array([[1.0]]), np.array([[1e6]]), np.zeros((1, 1)), np.zeros((1, 1)), np.array([1e6]))
    assert t[0] == pytest.approx(2 * pe * 1e6 / 989e12)


def test_slowest_gpu_and_all_to_all():
    m = MODELS["deepseek-v3"]
    cm = CostModel(GPUS["h100"], m, num_gpus=2, a2a_latency_us=7.0)
    active = np.array([[3.0, 9.0]])
    sent, received = np.array([[5.0, 2.0]]), np.array([[1.0, 6.0]])
    t = cm.layer_times(active, np.zeros((1, 2)), sent, received, np.array([8]))
    one = CostModel(GPUS["h100"], m, num_gpus=1)
    base = one.layer_times(np.array([[9.0]]), np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), np.array([4]))
    a2a = 2 * (7e-6 + 6 * 7168 * 2 / 450e9)
    # the busier GPU (9 experts) sets the pace; the all-to-all moves the largest per-GPU volume (6 tokens)
    assert t[0] == pytest.approx(base[0] + a2a)
    # more activated experts never make a layer faster
    more = cm.layer_times(active + 1, np.zeros((1, 2)), sent, received, np.array([8]))
    assert more[0] > t[0]


def test_step_time_and_otps_ratio():
    cm = CostModel(GPUS["h100"], MODELS["gpt-oss-120b"], num_gpus=1, selector_us=0.0)
    zero = np.zeros((3, 1))
    vanilla = cm.layer_times(np.full((3, 1), 60.0), zero, zero, zero, np.full(3, 16)).sum()
    fewer = cm.layer_times(np.full((3, 1), 40.0), zero, zero, zero, np.full(3, 16)).sum()
    v = cm.step_seconds(np.array([vanilla]), 3, selector=False)
    p = cm.step_seconds(np.array([fewer]), 3, selector=True)
    assert v[0] == pytest.approx(cm.non_moe_seconds() + vanilla / 3 * 36)
    assert 1.0 < v[0] / p[0] < 60 / 40  # the non-MoE time dilutes the gain
    with_sel = CostModel(GPUS["h100"], MODELS["gpt-oss-120b"], num_gpus=1, selector_us=10.0)
    assert with_sel.step_seconds(np.array([fewer]), 3, True)[0] == pytest.approx(p[0] + 36 * 10e-6)


@pytest.mark.parametrize("key", list(MODELS))
def test_presets_agree_with_published_parameter_counts(key):
    m = MODELS[key]
    assert m.routed_params + m.shared_params < m.total_params
    active = m.top_k * m.moe_layers * m.params_per_expert + m.shared_params + m.non_moe_params
    # shapes reproduce the published active count (embeddings explain the rest)
    assert active == pytest.approx(m.active_params, rel=0.15)
    # a trace of this shape picks the first preset of that shape (qwen3-235b-a22b shares qwen3-30b-a3b's)
    first = next(k for k, p in MODELS.items() if (p.num_experts, p.top_k) == (m.num_experts, m.top_k))
    assert match_model(m.num_experts, m.top_k) == first
    assert match_model(128, 8) == "qwen3-30b-a3b"


def test_unknown_shape_has_no_preset_and_bad_knobs_are_errors():
    assert match_model(64, 8) is None
    with pytest.raises(ValueError, match="hbm-efficiency"):
        CostModel(GPUS["h100"], MODELS["deepseek-v3"], 8, hbm_efficiency=1.5)
    with pytest.raises(ValueError, match="selector-us"):
        CostModel(GPUS["h100"], MODELS["deepseek-v3"], 8, selector_us=-1)


def test_tensor_parallel_slices_and_calibration_terms():
    m = MODELS["qwen3-235b-a22b"]
    z = np.zeros((1, 1))
    plain = CostModel(GPUS["h200"], m, 1, hbm_efficiency=1.0)
    tp8 = CostModel(GPUS["h200"], m, 1, hbm_efficiency=1.0, tp=8, moe_fixed_us=20.0, expert_hbm_efficiency=0.5)
    t1 = plain.layer_times(np.array([[10.0]]), np.array([[80.0]]), z, z, np.array([10]))[0]
    t8 = tp8.layer_times(np.array([[10.0]]), np.array([[80.0]]), z, z, np.array([10]))[0]
    # an eighth of each expert, at half the bandwidth, plus the fixed cost: 2/8 of the plain time + 20 us
    assert t8 == pytest.approx(t1 * 2 / 8 + 20e-6)
    assert tp8.non_moe_seconds() == pytest.approx(plain.non_moe_seconds() / 8)
    assert plain.kv_seconds(16, 0) == 0 and plain.kv_seconds(16, 1000) == pytest.approx(
        16 * 1000 * m.kv_bytes_per_token / 4.8e12)
    with pytest.raises(ValueError, match="tp"):
        CostModel(GPUS["h200"], m, 1, tp=0)


def test_assumptions_are_stated():
    cm = CostModel(GPUS["h200"], MODELS["deepseek-v2-lite"], num_gpus=16)
    text = "\n".join(cm.assumptions())
    for needle in ("4.80 TB/s", "DeepSeek-V2-Lite", "15.7B total", "2.4B active", "KV-cache", "inter-node network"):
        assert needle in text
    d = cm.describe()
    assert d["link"] == "network" and d["model"]["params_per_expert"] == 3 * 2048 * 1408
