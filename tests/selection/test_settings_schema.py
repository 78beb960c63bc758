"""One definition of the settings (xshare.selection.schema + the plugin's fields): everything that
reads or shows settings agrees with it — SelectorConfig, the environment/file settings, the admin
endpoint's request model, the CLI options, the docs' table and the Helm chart's values."""

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest

from xshare.selection import SelectorConfig
from xshare.selection.schema import OPERATOR_FIELDS, SELECTOR_FIELDS, Field, parse_bool_text, parse_count
from xshare.sglang import settings as S

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "k8s" / "xshare-sglang"


def test_plugin_settings_defaults_are_the_schema_defaults():
    defaults = S.PluginSettings()
    for f in S.PLUGIN_FIELDS:
        attr = "enabled" if f.name == "enable" else f.name
        assert getattr(defaults, attr) == f.default, f.name
    names = {"enabled" if f.name == "enable" else f.name for f in S.PLUGIN_FIELDS} | {"selector"}
    assert {f.name for f in dataclasses.fields(S.PluginSettings)} == names


def test_every_field_round_trips_through_the_environment():
    values = {"enable": True, "policy": "xshare_ep", "budget": 0.25, "warmup_k": 2, "group_budget": 6, "gpu_cap": 3,
              "min_tokens": 2, "max_tokens": 64, "stats_every": 4, "sim_gpus": 8,
              "cpu_kernel": False, "deepep_mode": "global", "fault_inject": "every:3"}
    got = S.load_settings(S.settings_env(values))
    assert got.enabled and not got.cpu_kernel and got.sim_gpus == 8 and got.deepep_mode == "global"
    assert got.fault_inject == "every:3" and got.stats_every == 4
    assert got.selector == SelectorConfig(policy="xshare_ep", budget=0.25, warmup_k=2, group_budget=6, gpu_cap=3,
                                          min_tokens=2, max_tokens=64)
    # extra: the knobs of the policy that reads them (a policy refuses keys it does not read)
    got = S.load_settings(S.settings_env({"policy": "lynx", "extra": {"lynx_alpha": 0.5}}))
    assert got.selector == SelectorConfig(policy="lynx", extra={"lynx_alpha": 0.5})
    with pytest.raises(S.SettingError, match="XSHARE_EXTRA.*reads no setting 'lynx_alpha'"):
        S.load_settings(S.settings_env({"policy": "xshare_ep", "extra": {"lynx_alpha": 0.5}}))


@pytest.mark.parametrize("f", [f for f in S.FIELDS if f.kind != "path"], ids=lambda f: f.name)  # any text is a path
def test_bad_text_is_refused_naming_the_variable(f: Field):
    bad = {"policy": "nope", "count": "0", "fraction": "1.5", "int": "-5", "bool": "maybe", "choice": "sideways",
           "mapping": "[1]", "text": "sometimes"}[f.kind]
    with pytest.raises(S.SettingError, match=f.env):
        S.load_settings({f.env: bad})


def test_docs_settings_table_is_generated_from_the_schema():
    text = (ROOT / "docs" / "sglang.md").read_text()
    m = re.search(r"<!-- settings-table:[^\n]*-->\n(.*?)\n<!-- /settings-table -->", text, re.S)
    assert m, "docs/sglang.md lost its settings-table markers"
    assert m.group(1) == S.settings_table(), "regenerate with xshare.sglang.settings.settings_table()"


def test_admin_request_model_is_derived_from_the_schema():
    from xshare.sglang.admin import CONFIG_FIELDS, ConfigUpdate

    assert CONFIG_FIELDS == tuple(f.name for f in OPERATOR_FIELDS)
    assert set(ConfigUpdate.model_fields) == {"enabled", *CONFIG_FIELDS}
    props = ConfigUpdate.model_json_schema()["properties"]
    for f in OPERATOR_FIELDS:
        assert f.help in props[f.name]["description"], f.name
        if f.kind == "int" and f.minimum:
            ints = [a for a in props[f.name]["anyOf"] if a.get("type") == "integer"]
            assert ints and ints[0].get("minimum") == f.minimum, f.name
    # strict: no coercion of text or bools into numbers
    from pydantic import ValidationError

    for bad in ({"budget": "8"}, {"warmup_k": True}, {"bogus": 1}):
        with pytest.raises(ValidationError):
            ConfigUpdate.model_validate(bad)


def test_cli_options_are_derived_from_the_schema():
    from xshare.commands import admin, serve

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    flags = {a for action in p._actions for a in action.option_strings}
    for f in S.FIELDS:
        if f.kind != "bool":
            assert "--xshare-" + f.name.replace("_", "-") in flags, f.name
    p = argparse.ArgumentParser()
    admin.add_arguments(p)
    flags = {a for action in p._actions for a in action.option_strings}
    assert {f.flag for f in OPERATOR_FIELDS} <= flags
    ns = p.parse_args(["set", "--url", "http://x", "--budget", "0.25", "--warmup-k", "2", "--gpu-cap", "none"])
    assert (ns.budget, ns.warmup_k, ns.gpu_cap) == (0.25, 2, None)
    with pytest.raises(SystemExit):
        p.parse_args(["set", "--url", "http://x", "--budget", "0"])


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def test_helm_values_are_schema_settings_with_the_schema_defaults():
    import yaml
    values = yaml.safe_load((CHART / "values.yaml").read_text())["xshare"]
    by_camel = {_camel("enabled" if f.name == "enable" else f.name): f for f in S.FIELDS}
    chart_choices = {"enabled": True, "deepepMode": ""}  # the chart turns the selector on; "" = plugin default
    for key, value in values.items():
        if key == "env":
            continue
        assert key in by_camel, f"values.yaml xshare.{key} is not a plugin setting"
        f = by_camel[key]
        assert value == chart_choices.get(key, f.default), f"xshare.{key}: chart {value!r}, schema {f.default!r}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]["xshare"]["properties"]) == set(values)
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    known = {f.env for f in S.FIELDS} | {name for name, *_ in S.OTHER_VARIABLES}
    used = set(re.findall(r"\bXSHARE_[A-Z_]+\b", helpers)) - {"XSHARE_"}
    assert used <= known, f"chart sets unknown variables {sorted(used - known)}"


def test_one_parser_for_counts_and_switches():
    assert parse_count("8") == 8 and parse_count("0.25") == 0.25
    for bad in ("0", "1.5", "x", "nan"):
        with pytest.raises(ValueError, match="budget"):
            parse_count(bad)
    assert [parse_bool_text(t) for t in ("on", "YES", "0", "", "maybe")] == [True, True, False, False, None]
    assert [f.name for f in SELECTOR_FIELDS if f.sweep] == ["budget", "target_mass", "warmup_k", "group_budget",
                                                            "gpu_cap"]
