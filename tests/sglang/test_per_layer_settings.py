"""Per-layer budgets and target masses: one value, a list (one per MoE layer) or a map layer id -> value
with a default, through the schema (environment, config file, admin model), checked against the served
model's MoE layers, resolved per layer, and held in per-layer device knobs."""

import pytest

from xshare.selection import SelectorConfig
from xshare.selection.registry import check_for_model, validate
from xshare.selection.schema import SELECTOR
from xshare.selection.types import ModelShape
from xshare.sglang.admin.config import ConfigInvalid, ConfigUpdate, build_config
from xshare.sglang.model_shape import moe_layer_ids
from xshare.sglang.observe import report
from xshare.sglang.settings import SettingError, load_settings
from xshare.sglang.state import ProcessState

MODEL = ModelShape(num_experts=64, top_k=6, moe_layers=(1, 2, 3, 4))


def test_forms_and_resolution():
    cfg = SelectorConfig(budget=[8, 16, 24, 32], target_mass={"default": 0.9, "3": 0.95, "4": None})
    assert cfg.per_layer and cfg.budget == (8, 16, 24, 32)
    layers = MODEL.moe_layers
    got = [(cfg.for_layer(i, layers).budget, cfg.for_layer(i, layers).target_mass) for i in layers]
    assert got == [(8, 0.9), (16, 0.9), (24, 0.95), (32, None)]
    assert cfg.for_layer(3, layers) is cfg.for_layer(3, layers)  # cached
    assert not cfg.for_layer(1, layers).per_layer
    plain = SelectorConfig(budget=8)
    assert plain.for_layer(5) is plain
    assert SelectorConfig(budget={"2": 4}).for_layer(7).budget == SELECTOR["budget"].default  # no default key
    assert cfg.budget_for(64) == 32 and cfg.to_dict()["budget"] == [8, 16, 24, 32]
    assert cfg.to_dict()["target_mass"] == {"default": 0.9, "3": 0.95, "4": None}


@pytest.mark.parametrize("value, needle", [
    ([8, 0], "budget[1]"), ({"default": 8, "x": 4}, "layer id"), ([], "empty list"), ([8, 1.5], "budget[1]"),
])
def test_bad_per_layer_values_name_the_setting(value, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
        SelectorConfig(budget=value)


def test_checked_against_the_models_moe_layers():
    validate(SelectorConfig(budget=[8, 8, 8, 8]), MODEL)
    validate(SelectorConfig(budget={"default": 8, "4": 16}), MODEL)
    with pytest.raises(ValueError, match="budget: a per-layer list has 3 values, the model has 4 MoE layers"):
        check_for_model(SelectorConfig(budget=[8, 8, 8]), MODEL)
    with pytest.raises(ValueError, match="target_mass: unknown MoE layer id"):
        check_for_model(SelectorConfig(target_mass={"0": 0.9}), MODEL)  # layer 0 is dense
    with pytest.raises(ValueError, match="MoE layers, which are unknown"):
        check_for_model(SelectorConfig(budget=[8]), ModelShape(64, 6))


def test_environment_and_config_file(tmp_path):
    s = load_settings({"XSHARE_BUDGET": '{"default": 8, "3": 16}', "XSHARE_TARGET_MASS": "[0.9, 0.95]"})
    assert dict(s.selector.budget) == {"default": 8, "3": 16} and s.selector.target_mass == (0.9, 0.95)
    with pytest.raises(SettingError, match="^XSHARE_BUDGET"):
        load_settings({"XSHARE_BUDGET": "[8, 0]"})
    with pytest.raises(SettingError, match="^XSHARE_TARGET_MASS"):
        load_settings({"XSHARE_TARGET_MASS": '{"1": 2}'})
    path = tmp_path / "c.json"
    path.write_text('{"budget": [4, 8]}')
    assert load_settings({"XSHARE_CONFIG": str(path)}).selector.budget == (4, 8)


def test_admin_change_validates_layer_ids_and_leaves_the_config():
    fields = ConfigUpdate.model_fields
    current = {"enabled": True, **{k: v for k, v in SelectorConfig().to_dict().items() if k in fields}}
    ConfigUpdate(budget=[8, 16], target_mass={"default": 0.9})  # the request model takes both forms
    ok = build_config(current, {"budget": {"default": 8, "2": 16}}, replace_all=False, model=MODEL)
    assert ok["budget"] == {"default": 8, "2": 16}
    for update, field in (({"budget": {"9": 8}}, "budget"), ({"budget": [8, 8]}, "budget"),
                          ({"target_mass": {"0": 0.5}}, "target_mass"), ({"budget": [8, 8, 80, 8]}, "budget")):
        with pytest.raises(ConfigInvalid) as exc:
            build_config(current, update, replace_all=False, model=MODEL)
        assert exc.value.field == field, exc.value
    assert current["budget"] == SelectorConfig().budget  # unchanged


def test_moe_layer_ids_from_model_configs():
    class C:
        def __init__(self, **kw):
            self.__dict__.update(kw)
    assert moe_layer_ids(C(num_hidden_layers=27, n_routed_experts=64, first_k_dense_replace=1, moe_layer_freq=1)) \
        == tuple(range(1, 27))
    assert moe_layer_ids(C(num_hidden_layers=4, num_experts=8, mlp_only_layers=[0], decoder_sparse_step=1)) == (1, 2, 3)
    assert moe_layer_ids(C(num_hidden_layers=4, num_experts=8, decoder_sparse_step=2)) == (1, 3)
    assert moe_layer_ids(C(num_hidden_layers=4)) == ()  # no experts: not an MoE model


def test_runtime_keeps_one_knob_set_per_layer_updated_in_place():
    import torch

    from xshare.sglang.settings import PluginSettings

    rt = ProcessState(PluginSettings(enabled=True, selector=SelectorConfig(budget={"default": 8, "2": 16})))
    rt.moe_layers = (1, 2)
    k1 = rt.knobs_for(rt.layer_config(rt.settings.selector, 1), 64, 6, torch.device("cpu"), 1)
    k2 = rt.knobs_for(rt.layer_config(rt.settings.selector, 2), 64, 6, torch.device("cpu"), 2)
    assert (int(k1.budget), int(k2.budget)) == (8, 16)
    ptr = k2.budget.data_ptr()
    rt.update_settings(PluginSettings(enabled=True, selector=SelectorConfig(budget=[4, 32], target_mass=[None, 0.9])))
    assert (int(k1.budget), int(k2.budget)) == (8, 16)  # written at the next forward boundary, not in between
    rt.sync_knobs()
    assert (int(k1.budget), int(k2.budget)) == (4, 32) and k2.budget.data_ptr() == ptr
    assert float(k1.target_mass) == 0.0 and float(k2.target_mass) == pytest.approx(0.9)


def test_a_per_layer_list_that_does_not_fit_the_loaded_model_refuses_to_start():
    from xshare.sglang.observe.report import SettingsRefused
    from xshare.sglang.settings import PluginSettings

    rt = ProcessState(PluginSettings(enabled=True, selector=SelectorConfig(budget=[6, 8, 8])))
    with pytest.raises(SettingsRefused, match=r"^xshare: refusing to start: XSHARE_BUDGET: budget: .*3 values.*4 MoE"):
        report.check_model_settings(rt, 64, 6, (1, 2, 3, 4))
    rt = ProcessState(PluginSettings(enabled=True, selector=SelectorConfig(target_mass={"7": 0.9})))
    with pytest.raises(SettingsRefused, match="XSHARE_TARGET_MASS: target_mass: unknown MoE layer id"):
        report.check_model_settings(rt, 64, 6, (1, 2, 3, 4))
    rt = ProcessState(PluginSettings(enabled=True, selector=SelectorConfig(budget=[6, 8, 8, 8])))
    report.check_model_settings(rt, 64, 6, (1, 2, 3, 4))
    assert rt.moe_layers == (1, 2, 3, 4) and rt.layer_config(rt.settings.selector, 2).budget == 8
