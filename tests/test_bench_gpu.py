"""``xshare bench gpu``: the prepared GPU check, in its CPU mode (what CI can run).

The CPU mode runs the same code paths as on a GPU (the Triton kernels in the interpreter, the
recorded-launch "replays", the MoE kernel checked against its torch reference) at a tiny size. The
first test runs it through the CLI in a fresh interpreter where every package other than torch,
triton, numpy, the standard library and this package is blocked (and sglang is importable in this
venv, so a stray import would be caught): the check must work where only those exist. The others
show that the check can fail: a wrong selector or MoE kernel makes it report the failure and exit 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT, require_module

require_module("triton", "requirements/dev.txt")

from xshare.bench import gpu  # noqa: E402
from xshare.cli import main  # noqa: E402

# A meta-path finder: an import made by this package's code (or the driver) loads only if it is in the
# standard library or one of the allowed packages; what torch, triton, numpy or the standard library import
# themselves (their own optional imports, e.g. torch's of tqdm) is their business; sglang never loads.
_DRIVER = textwrap.dedent(r"""
    import importlib.abc, os, sys
    ALLOWED = {"torch", "torchgen", "triton", "numpy", "xshare"}
    blocked = []

    def importer():
        f = sys._getframe(2)
        while f is not None:
            name = f.f_globals.get("__name__", "") or ""
            if not (name.startswith("importlib") or name.startswith("_frozen_importlib")):
                return name
            f = f.f_back
        return ""

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            top = fullname.split(".")[0]
            ours = importer().split(".")[0] in ("xshare", "__main__", "runpy")
            if top in ("sglang", "sgl_kernel") or (ours and top not in sys.stdlib_module_names
                                                    and top not in ALLOWED and top not in sys.modules):
                blocked.append(fullname)
                raise ModuleNotFoundError(f"blocked: {fullname}", name=fullname)
            return None

    sys.meta_path.insert(0, Block())
    import runpy
    sys.argv = ["xshare", "bench", "gpu", "--cpu", "--out", sys.argv[1]]
    try:
        runpy.run_module("xshare", run_name="__main__")
        rc = 0
    except SystemExit as e:
        rc = e.code
    mods = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names))
    print("RESULT", rc, ",".join(blocked), ",".join(mods))
    sys.exit(0)
""")


def test_cpu_mode_runs_every_part_where_only_torch_triton_numpy_exist(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "overlay"))
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1].split(" ")
    rc, blocked, mods = line[1], line[2], line[3].split(",")
    assert rc == "0", proc.stdout[-4000:] + proc.stderr[-2000:]
    assert blocked == "", f"the check tried to import {blocked}"
    assert "sglang" not in mods and "matplotlib" not in mods

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["schema"] == "xshare-gpu-check/1" and report["meta"]["mode"] == "cpu"
    parts = report["parts"]
    assert list(parts) == list(gpu.PARTS)
    assert all(p["status"] == "ok" for p in parts.values()), {k: p["status"] for k, p in parts.items()}
    p1 = parts["selector_vs_reference"]
    families = {f.rsplit("/", 1)[0] for f in p1["families"]}
    assert families == {"xshare/softmax", "xshare/sigmoid", "xshare_ep/softmax", "xshare_ep/sigmoid"}
    assert p1["passed"] == p1["run"] == p1["cases"] >= 16 and not p1["failures"]
    p2 = parts["cuda_graph"]
    assert {(r["backend"], r["policy"]) for r in p2["runs"]} == {
        (b, p) for b in ("triton", "torch") for p in ("xshare", "xshare_ep")}
    assert all(r["equal"] and r["followed_knobs"] and r["replays"] >= 8 for r in p2["runs"])
    assert {r["mode"] for r in p2["runs"]} == {"cpu-relaunch", "cpu-call"}
    p3 = parts["selector_timing"]
    assert len(p3["points"]) == 2 and all(q["kernel_us"] > 0 and q["topk_us"] > 0 for q in p3["points"])
    p4 = parts["moe_layer"]
    assert [r["model"] for r in p4["rows"]] == list(gpu.CPU_MOE_SHAPES)
    for r in p4["rows"]:
        shape = gpu.CPU_MOE_SHAPES[r["model"]]
        assert r["vanilla"]["correct"] and r["xshare"]["correct"]
        assert r["xshare"]["active_experts"] <= r["vanilla"]["active_experts"] <= shape["experts"] // shape["ep"]
        assert 0 < r["selector_share"] < 1 and r["kernel_speedup"] > 0
    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## 1.", "## 2.", "## 3.", "## 4."):
        assert heading in md


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["bench", "gpu", "--cpu", "--out", str(tmp_path), *extra]


def test_a_wrong_selector_kernel_fails_the_check(tmp_path, monkeypatch):
    import xshare.selection.kernels as kernels

    real = kernels.fused_select

    def wrong(*a, **kw):
        r = real(*a, **kw)
        r.topk_ids.copy_(r.topk_ids.flip(-1))  # same experts, wrong order
        return r

    monkeypatch.setattr(kernels, "fused_select", wrong)
    assert main(_args(tmp_path, "--parts", "selector_vs_reference")) == 1
    p1 = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["selector_vs_reference"]
    assert p1["status"] == "fail" and p1["failures"] and "topk_ids differ" in p1["failures"][0]["diffs"][0]


def test_a_wrong_moe_kernel_fails_the_check(tmp_path, monkeypatch):
    from xshare.bench import _fused_moe

    real = _fused_moe.FusedMoE.__call__
    monkeypatch.setattr(_fused_moe.FusedMoE, "__call__", lambda self, x, al, w, b: real(self, x, al, w, b) * 1.1)
    assert main(_args(tmp_path, "--parts", "moe_layer")) == 1
    p4 = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["moe_layer"]
    assert p4["status"] == "fail" and not any(r["vanilla"]["correct"] for r in p4["rows"])


def test_the_report_is_on_disk_after_each_part_and_a_raising_part_is_reported(tmp_path, monkeypatch):
    seen = {}

    def second(ctx):
        seen.update(json.loads((tmp_path / "gpu_check.json").read_text())["parts"])
        raise RuntimeError("cut off")

    monkeypatch.setitem(gpu.PART_FNS, "cuda_graph", second)
    assert main(_args(tmp_path, "--parts", "selector_vs_reference,cuda_graph")) == 1
    assert seen["selector_vs_reference"]["status"] == "ok"  # written before the second part started
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["cuda_graph"]["status"] == "error" and "cut off" in parts["cuda_graph"]["error"]
    assert "cut off" in (tmp_path / "gpu_check.md").read_text()


def test_a_spent_time_budget_leaves_parts_incomplete_not_failed(tmp_path):
    assert main(_args(tmp_path, "--parts", "selector_vs_reference,selector_timing", "--time-budget", "1e-6")) == 0
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["selector_vs_reference"]["status"] == "incomplete" and parts["selector_vs_reference"]["run"] == 0
    assert parts["selector_timing"]["status"] == "incomplete" and parts["selector_timing"]["skipped"] == 2


@pytest.mark.parametrize("extra, needle", [
    (["--parts", "nope"], "--parts"),
    (["--replays", "0"], "--replays"),
    (["--extra-cases", "-1"], "--extra-cases"),
    (["--time-budget", "0"], "--time-budget"),
])
def test_bad_arguments_are_named(tmp_path, capsys, extra, needle):
    assert main(_args(tmp_path / "out", *extra)) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out" / "gpu_check.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_the_gpu_mode_asks_for_cpu(tmp_path, capsys):
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 2
    assert "--cpu" in capsys.readouterr().err
