"""``xshare bench soak`` without a server: its random configs are valid for the model and cover the registry, its
invalid changes are invalid, and the command refuses non-loopback URLs and unbounded runs (the soak itself runs
against a live server in tests/e2e/test_metrics_e2e.py)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from xshare.bench._soak_traffic import Shape, invalid_changes, random_config
from xshare.bench.soak import check_loopback
from xshare.selection import SelectorConfig
from xshare.selection.registry import available_policies, validate
from xshare.selection.types import ModelShape

SHAPE = Shape(num_experts=32, top_k=4)


def test_random_configs_are_valid_and_cover_the_registry():
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        body = random_config(rng, SHAPE)
        fields = {k: v for k, v in body.items() if k != "enabled"}
        config = SelectorConfig(**fields)
        validate(config, ModelShape(num_experts=32, top_k=4))
        assert SHAPE.top_k <= config.budget_for(SHAPE.num_experts) <= SHAPE.num_experts
        seen.add(body["policy"])
    assert seen == set(available_policies())


def test_invalid_changes_are_invalid():
    from xshare.sglang import admin

    cur = {**{k: v for k, v in SelectorConfig(budget=8).to_dict().items() if k in admin.CONFIG_FIELDS},
           "enabled": True}
    for what, method, body in invalid_changes(SHAPE):
        if not isinstance(body, dict):
            continue  # not an object: refused before any field is read
        try:  # pydantic's ValidationError and ConfigInvalid are ValueErrors
            update = admin.ConfigUpdate.model_validate(body).model_dump(exclude_unset=True)
            admin.build_config(cur, update, replace_all=method == "PUT", model=ModelShape(num_experts=32, top_k=4))
        except ValueError:
            continue
        pytest.fail(f"{what} accepted: {body}")


def test_loopback_only_and_bounded():
    import argparse

    from xshare.bench import soak

    assert check_loopback("http://127.0.0.1:3000/") == "http://127.0.0.1:3000"
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://10.0.0.5:3000")
    p = argparse.ArgumentParser()
    soak.add_arguments(p)
    for args, msg in ((["--url", "http://example.com:80", "--token", "t"], "loopback"),
                      (["--url", "http://127.0.0.1:9"], "--token"),
                      (["--duration", "7200"], "at most 3600"), (["--clients", "0"], "--clients")):
        assert msg in (soak._check(p.parse_args(args)) or ""), args
    assert soak._check(p.parse_args([])) is None
    # the command line refuses before it starts anything
    r = subprocess.run([sys.executable, "-m", "xshare.cli", "bench", "soak", "--url", "http://10.1.2.3:80", "--token",
                        "t"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "loopback" in r.stderr, r.stderr
