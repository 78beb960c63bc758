"""SelectorConfig: immutable, validated, errors name the setting."""

import dataclasses

import pytest

from xshare.selection import SelectorConfig, available_policies


def test_policies_registered():
    assert set(available_policies()) >= {
        "topk", "xshare", "xshare_ep", "xshare_spec", "lynx", "des_vote", "des_seq", "oea"
    }


def test_frozen():
    cfg = SelectorConfig(policy="xshare", budget=32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.budget = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.extra["x"] = 1.0  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"policy": "nope"}, "policy"),
        ({"policy": 3}, "policy"),
        ({"budget": 0}, "budget"),
        ({"budget": -1}, "budget"),
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"budget": float("nan")}, "budget"),
        ({"budget": True}, "budget"),
        ({"budget": "32"}, "budget"),
        ({"group_budget": 0}, "group_budget"),
        ({"warmup_k": -1}, "warmup_k"),
        ({"warmup_k": 1.0}, "warmup_k"),
        ({"gpu_cap": 0}, "gpu_cap"),
        ({"scoring": "relu"}, "scoring"),
        ({"renormalize": 1}, "renormalize"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 8, "max_tokens": 4}, "max_tokens"),
        ({"extra": {"a": "b"}}, "extra"),
        ({"policy": "oea", "warmup_k": 0}, "warmup_k"),
        ({"policy": "des_seq", "warmup_k": 0}, "warmup_k"),
        ({"policy": "lynx", "extra": {"lynx_alpha": 0.0}}, "lynx_alpha"),
        ({"policy": "lynx", "extra": {"lynx_gamma": 1.0}}, "lynx_gamma"),
    ],
)
def test_invalid_settings_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SelectorConfig(**kwargs)


def test_budget_resolution():
    assert SelectorConfig(budget=32).budget_for(64) == 32
    assert SelectorConfig(budget=500).budget_for(64) == 64  # clamped to E
    assert SelectorConfig(budget=0.5).budget_for(64) == 32
    assert SelectorConfig(budget=0.3).budget_for(64) == 20  # rounded up
    assert SelectorConfig(budget=1e-6).budget_for(64) == 1
    assert SelectorConfig(budget=1.0).budget_for(128) == 128
    assert SelectorConfig(group_budget=None).group_budget_for(64, 6) == 6
    assert SelectorConfig(group_budget=12).group_budget_for(64, 6) == 12


def test_batch_size_range():
    cfg = SelectorConfig(min_tokens=2, max_tokens=48)
    assert not cfg.applies_to(1)
    assert cfg.applies_to(2) and cfg.applies_to(48)
    assert not cfg.applies_to(49)
    assert SelectorConfig().applies_to(10_000)


def test_dict_round_trip_and_unknown_keys():
    cfg = SelectorConfig(policy="xshare_ep", budget=0.25, gpu_cap=4, extra={"k": 1.0})
    assert SelectorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        SelectorConfig.from_dict({"policy": "xshare", "bogus": 1})


def test_replace_validates():
    cfg = SelectorConfig(budget=16)
    assert cfg.replace(budget=8).budget == 8
    with pytest.raises(ValueError, match="budget"):
        cfg.replace(budget=0)
