"""XSHARE_PROFILE: forward and MoE-block host times per forward mode (hooks on plain objects; the
real server path is covered by tests/e2e/test_bench_serve.py, which reads the MoE share from /metrics)."""

import time
from types import SimpleNamespace

import pytest

from xshare.sglang import state as rt
from xshare.sglang.hooks import forward as forward_hooks
from xshare.sglang.observe.stats import SelectorStats
from xshare.sglang.settings import PluginSettings, SettingError, load_settings


def test_snapshot_gives_the_moe_share_per_mode():
    st = SelectorStats()
    for _ in range(4):
        st.record_forward_time("decode", 0.010)
        for _layer in range(3):
            st.record_moe_time("decode", 0.002)
    st.record_forward_time("extend", 0.5)
    prof = st.snapshot()["profile"]
    assert prof["decode"]["forwards"] == 4 and prof["decode"]["moe_calls"] == 12
    assert prof["decode"]["moe_share"] == pytest.approx(0.6)
    assert prof["extend"]["moe_share"] == 0.0 and prof["extend"]["moe_calls"] == 0


def test_setting_parses_and_rejects_junk():
    assert load_settings({"XSHARE_PROFILE": "1"}).profile is True
    assert load_settings({}).profile is False
    with pytest.raises(SettingError, match="XSHARE_PROFILE"):
        load_settings({"XSHARE_PROFILE": "sometimes"})


@pytest.mark.parametrize("profile", [True, False])
def test_hooks_time_the_forward_and_the_moe_blocks_inside_it(profile):
    runtime = rt.install(PluginSettings(enabled=False, profile=profile))
    try:
        runtime.scattered_input = False  # skip the once-per-process SGLang lookups

        def moe_block(self, x):
            time.sleep(0.004)
            return x

        def forward(self, forward_batch):
            time.sleep(0.002)
            for _layer in range(2):  # the MoE hook sees the forward's mode through the runtime stack
                forward_hooks.moe_forward_hook(moe_block, None, 1)
            return "out"

        mode = SimpleNamespace(is_target_verify=lambda: False, is_decode=lambda: True, is_idle=lambda: False,
                               is_extend=lambda: False)
        batch = SimpleNamespace(forward_mode=mode, batch_size=4)
        assert forward_hooks.model_runner_forward_hook(forward, SimpleNamespace(), batch) == "out"
        prof = runtime.stats.profile_snapshot()
        if not profile:
            assert "decode" not in prof or prof["decode"]["forwards"] == 0
            return
        d = prof["decode"]
        assert d["forwards"] == 1 and d["moe_calls"] == 2
        assert d["moe_seconds"] >= 0.008 and d["forward_seconds"] >= d["moe_seconds"] + 0.002
        assert 0.5 < d["moe_share"] < 1.0
    finally:
        rt.uninstall()
