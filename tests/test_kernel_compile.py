"""The fused kernels compile for a GPU (sm_90, H100) without one: Triton's own compiler and the
``ptxas`` shipped in its wheel turn them into a cubin here, from exactly the arguments that
``fused_select`` binds. This catches what the interpreter does not check (types, layouts, register
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
from xshare.selection.kernels import _triton_select, prepare_launch  # noqa: E402

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


CASES = {
    "xshare-knobs-bf16": dict(policy="xshare", rows=16, experts=128, top_k=8, dtype=torch.bfloat16, knobs=True),
    "xshare_ep-knobs-G8": dict(policy="xshare_ep", rows=64, experts=256, top_k=8, dtype=torch.float32, knobs=True),
    "xshare-sigmoid-plain": dict(policy="xshare", rows=3, experts=60, top_k=6, dtype=torch.float16, knobs=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_compile_for_sm90_without_spills(case, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    c = CASES[case]
    sigmoid = case.endswith("plain")
    config = SelectorConfig(policy=c["policy"], budget=0.25, scoring="sigmoid" if sigmoid else "softmax",
                            renormalize=not sigmoid)
    logits = torch.randn(c["rows"], c["experts"]).to(c["dtype"])
    kw = {}
    if c["knobs"]:
        kw = {"knobs": SelectorKnobs.create(config, c["experts"], c["top_k"]), "num_tokens": torch.tensor(c["rows"])}
    placement = Placement.contiguous(c["experts"], 8) if c["policy"] == "xshare_ep" else None
    launch = prepare_launch(logits, c["top_k"], config, placement=placement, **kw)
    kernels = [(_triton_select._batch_set_kernel, launch.set_args, launch.set_warps),
               (_triton_select._route_kernel, launch.route_args, launch.route_warps)]
    for kernel, args, warps in kernels:
        names = {p.name for p in kernel.params if p.is_constexpr}
        compiled = _compile(kernel, args, warps, names)
        cubin = tmp_path / f"{kernel.fn.__name__}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        assert ".entry " + kernel.fn.__name__ in compiled.asm["ptx"]
        usage = subprocess.run([os.fspath(_BIN / "cuobjdump"), "--dump-resource-usage", os.fspath(cubin)],
                               capture_output=True, text=True, check=True).stdout
        local = re.search(r"LOCAL:(\d+)", usage)
        assert local is not None, usage
        assert int(local.group(1)) == 0, f"{kernel.fn.__name__} spills registers: {usage}"
