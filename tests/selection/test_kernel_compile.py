"""The fused kernels compile for a GPU (sm_90, H100) without one: Triton's own compiler and the
``ptxas`` shipped in its wheel turn them into a cubin here, from exactly the arguments that
``select(backend="triton")`` binds. This catches what the interpreter does not check (types, layouts, register
pressure): the cubin must not spill to local memory.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import missing, require_module

triton = require_module("triton", "requirements/dev.txt")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from xshare.selection import Placement, SelectorConfig, SelectorKnobs  # noqa: E402
from xshare.selection.backends.triton.launch import prepare_fused, triton_module  # noqa: E402
from xshare.selection.routers.spec import RouterSpec  # noqa: E402

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
if not (_BIN / "ptxas").exists():  # shipped in the triton wheel (no GPU needed): a failure in CI
    missing(f"Triton's NVIDIA backend (ptxas) is not installed in {_BIN}")
pytestmark = pytest.mark.slow


def _compile(kernel, args: dict, num_warps: int, constexpr_names: set[str]):
    # as a launch specialises: None and (unless marked do_not_specialize) an int 1 become constants
    keep = {p.name for p in kernel.params if p.do_not_specialize}
    signature, constexprs = {}, {}
    for name in kernel.arg_names:
        value = args[name]
        is_one = isinstance(value, int) and not isinstance(value, bool) and value == 1 and name not in keep
        if name in constexpr_names or value is None or is_one:
            signature[name] = "constexpr"
            constexprs[name] = value
        else:
            signature[name] = mangle_type(value)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "enable_fp_fusion": False}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _biased(experts: int, groups: int | None, keep: int | None) -> RouterSpec:
    return RouterSpec(scoring="sigmoid", correction_bias=torch.randn(experts) * 0.1, num_expert_group=groups,
                      topk_group=keep, renormalize=True, routed_scaling_factor=2.5, scaling_in_weights=True)


# The served shapes at decode's largest batch (B = 64 rows), each router family.
CASES = {
    "xshare-plain-knobs-bf16": dict(policy="xshare", rows=16, experts=128, top_k=8, dtype=torch.bfloat16),
    "xshare_ep-plain-G8": dict(policy="xshare_ep", rows=64, experts=256, top_k=8, dtype=torch.float32),
    "xshare_spec-verify-16x4": dict(policy="xshare_spec", rows=64, experts=128, top_k=8, dtype=torch.bfloat16),
    "deepseek_v3-grouped-biased": dict(policy="xshare", rows=64, experts=256, top_k=8, dtype=torch.bfloat16,
                                       spec=lambda: _biased(256, 8, 4)),
    "kimi_k2-one-group-biased": dict(policy="xshare", rows=64, experts=384, top_k=8, dtype=torch.bfloat16,
                                     spec=lambda: _biased(384, 1, 1)),
    "deepseek_v2-grouped-softmax-ep": dict(policy="xshare_ep", rows=64, experts=160, top_k=6, dtype=torch.bfloat16,
                                           spec=lambda: RouterSpec(scoring="softmax", num_expert_group=8,
                                                                   topk_group=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_compile_for_sm90_without_spills(case, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    c = CASES[case]
    spec = c["spec"]() if "spec" in c else None
    mass = None if c["policy"] == "xshare_spec" else 0.9
    config = SelectorConfig(policy=c["policy"], budget=0.25, target_mass=mass, scoring=c.get("scoring", "softmax"))
    logits = torch.randn(c["rows"], c["experts"]).to(c["dtype"])
    knobs = SelectorKnobs.create(config, c["experts"], c["top_k"])
    placement = Placement.contiguous(c["experts"], 8) if c["policy"] == "xshare_ep" else None
    engine_ids = torch.topk(logits.float(), c["top_k"], dim=-1).indices.to(torch.int32)
    launch = prepare_fused(logits, c["top_k"], spec, config, engine_ids=engine_ids, placement=placement, knobs=knobs,
                           num_tokens=torch.tensor(c["rows"]), exact=torch.zeros(c["rows"], dtype=torch.bool),
                           groups=torch.arange(c["rows"]) // 4 if c["policy"] == "xshare_spec" else None)
    mod = triton_module()
    for kernel, args in ((mod._gate_kernel, launch.gate_args), (mod._route_kernel, launch.route_args)):
        names = {p.name for p in kernel.params if p.is_constexpr}
        compiled = _compile(kernel, args, launch.num_warps, names)
        cubin = tmp_path / f"{kernel.fn.__name__}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        assert ".entry " + kernel.fn.__name__ in compiled.asm["ptx"]
        usage = subprocess.run([os.fspath(_BIN / "cuobjdump"), "--dump-resource-usage", os.fspath(cubin)],
                               capture_output=True, text=True, check=True).stdout
        local = re.search(r"LOCAL:(\d+)", usage)
        assert local is not None, usage
        assert int(local.group(1)) == 0, f"{kernel.fn.__name__} spills registers: {usage}"
