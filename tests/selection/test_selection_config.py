"""SelectorConfig: immutable, validated, errors name the setting."""

import dataclasses

import pytest

from xshare.selection import SelectorConfig, available_policies
from xshare.selection.registry import validate


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
    # A config is plain data: its fields are checked at construction, the policy (its name and
    # what it accepts) where the config is used.
    with pytest.raises(ValueError, match=name):
        validate(SelectorConfig(**kwargs))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"policy": "nope"}, "policy"), ({"policy": "oea", "warmup_k": 0}, "warmup_k"),
     ({"policy": "lynx", "extra": {"lynx_alpha": 0.0}}, "lynx_alpha")],
)
def test_policy_checks_happen_where_the_config_is_used(kwargs, name):
    import torch

    from xshare.selection import select

    cfg = SelectorConfig(**kwargs)  # plain data: constructing it does not consult the registry
    with pytest.raises(ValueError, match=name):
        select(torch.zeros(2, 8), 2, cfg)


def test_config_fields_are_the_schema():
    from xshare.selection.schema import SELECTOR_FIELDS

    assert [f.name for f in dataclasses.fields(SelectorConfig)] == [f.name for f in SELECTOR_FIELDS]
    defaults = SelectorConfig()
    for f in SELECTOR_FIELDS:
        assert getattr(defaults, f.name) == f.default, f.name


def test_config_module_imports_no_policy():
    import ast

    import xshare.selection.config as config_module

    tree = ast.parse(open(config_module.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("xshare")} == {"xshare.selection.schema"}
