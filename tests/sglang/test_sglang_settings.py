"""The plugin's settings: XSHARE_* variables and the XSHARE_CONFIG file (no sglang needed)."""

import json

import pytest

from xshare.selection import SelectorConfig
from xshare.sglang.settings import PluginSettings, SettingError, load_settings, settings_env


def test_defaults_are_off():
    s = load_settings({})
    assert s == PluginSettings()
    assert not s.enabled


def test_env_values_reach_the_selector_config():
    s = load_settings({"XSHARE_ENABLE": "1", "XSHARE_POLICY": "xshare_spec", "XSHARE_BUDGET": "8",
                       "XSHARE_WARMUP_K": "0", "XSHARE_GROUP_BUDGET": "0.25", "XSHARE_MIN_TOKENS": "2",
                       "XSHARE_MAX_TOKENS": "512", "XSHARE_STATS_DIR": "/tmp/x", "XSHARE_STATS_EVERY": "3",
                       "XSHARE_APPLY_PREFILL": "yes"})
    assert s.enabled and s.apply_prefill
    assert s.selector == SelectorConfig(policy="xshare_spec", budget=8, warmup_k=0, group_budget=0.25,
                                        min_tokens=2, max_tokens=512)
    assert isinstance(s.selector.budget, int) and isinstance(s.selector.group_budget, float)
    assert str(s.stats_dir) == "/tmp/x" and s.stats_every == 3


def test_fraction_budget_and_none_values():
    s = load_settings({"XSHARE_BUDGET": "0.5", "XSHARE_GPU_CAP": "none", "XSHARE_MAX_TOKENS": ""})
    assert s.selector.budget == 0.5 and s.selector.gpu_cap is None and s.selector.max_tokens is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"XSHARE_POLICY": "no_such_policy"}, "XSHARE_POLICY"),
        ({"XSHARE_BUDGET": "0"}, "XSHARE_BUDGET"),
        ({"XSHARE_BUDGET": "1.5"}, "XSHARE_BUDGET"),
        ({"XSHARE_BUDGET": "lots"}, "XSHARE_BUDGET"),
        ({"XSHARE_WARMUP_K": "-1"}, "XSHARE_WARMUP_K"),
        ({"XSHARE_MIN_TOKENS": "8", "XSHARE_MAX_TOKENS": "4"}, "XSHARE_MAX_TOKENS"),
        ({"XSHARE_ENABLE": "maybe"}, "XSHARE_ENABLE"),
        ({"XSHARE_DEEPEP_MODE": "everywhere"}, "XSHARE_DEEPEP_MODE"),
        ({"XSHARE_DEEPEP_MODE": "global", "XSHARE_POLICY": "lynx"}, "XSHARE_DEEPEP_MODE"),
        ({"XSHARE_FAULT_INJECT": "sometimes"}, "XSHARE_FAULT_INJECT"),
        ({"XSHARE_EXTRA": "{not json"}, "XSHARE_EXTRA"),
        ({"XSHARE_STATS_EVERY": "0"}, "XSHARE_STATS_EVERY"),
        ({"XSHARE_TARGET_MASS": "0"}, "XSHARE_TARGET_MASS"),
        ({"XSHARE_TARGET_MASS": "1.2"}, "XSHARE_TARGET_MASS"),
        ({"XSHARE_TARGET_MASS": "most"}, "XSHARE_TARGET_MASS"),
        ({"XSHARE_TARGET_MASS": "0.9", "XSHARE_POLICY": "oea"}, "XSHARE_TARGET_MASS"),
    ],
)
def test_bad_values_name_the_variable(env, named):
    with pytest.raises(SettingError) as e:
        load_settings(env)
    assert str(e.value).startswith(named), str(e.value)


def test_config_file_and_env_override(tmp_path):
    cfg = tmp_path / "xshare.json"
    cfg.write_text(json.dumps({"enable": True, "policy": "xshare", "budget": 6, "extra": {}}))
    s = load_settings({"XSHARE_CONFIG": str(cfg)})
    assert s.enabled and s.selector.budget == 6
    s = load_settings({"XSHARE_CONFIG": str(cfg), "XSHARE_BUDGET": "3"})
    assert s.selector.budget == 3


def test_config_file_errors_name_file_and_key(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"enable": True, "budget": 0}))
    with pytest.raises(SettingError, match=r"XSHARE_CONFIG=.*bad.json key 'budget'"):
        load_settings({"XSHARE_CONFIG": str(cfg)})
    cfg.write_text(json.dumps({"enable": True, "bugdet": 4}))
    with pytest.raises(SettingError, match="unknown key.*bugdet"):
        load_settings({"XSHARE_CONFIG": str(cfg)})
    cfg.write_text("[1, 2]")
    with pytest.raises(SettingError, match="JSON object"):
        load_settings({"XSHARE_CONFIG": str(cfg)})
    with pytest.raises(SettingError, match="no such file"):
        load_settings({"XSHARE_CONFIG": str(tmp_path / "missing.json")})


def test_settings_env_round_trip():
    env = settings_env({"enable": True, "policy": "lynx", "budget": 0.25, "gpu_cap": 2, "extra": {"lynx_beta": 1}})
    assert env == {"XSHARE_ENABLE": "1", "XSHARE_POLICY": "lynx", "XSHARE_BUDGET": "0.25",
                   "XSHARE_GPU_CAP": "2", "XSHARE_EXTRA": '{"lynx_beta": 1}'}
    s = load_settings(env)
    assert s.selector.policy == "lynx" and s.selector.gpu_cap == 2 and dict(s.selector.extra) == {"lynx_beta": 1}
    with pytest.raises(SettingError, match="unknown setting"):
        settings_env({"budgett": 3})


def test_target_mass_reaches_the_selector_config():
    s = load_settings({"XSHARE_TARGET_MASS": "0.9", "XSHARE_BUDGET": "1.0"})
    assert s.selector.target_mass == 0.9 and s.selector.budget == 1.0
    assert load_settings({"XSHARE_TARGET_MASS": "none"}).selector.target_mass is None
    assert settings_env({"target_mass": 0.9})["XSHARE_TARGET_MASS"] == "0.9"
