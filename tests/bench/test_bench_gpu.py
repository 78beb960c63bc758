"""``xshare bench gpu``: the prepared GPU check, in its CPU mode (what CI can run).

The CPU mode runs the same code paths as on a GPU (the Triton kernels in the interpreter, the
recorded-launch "replays", the MoE kernel checked against its torch reference) at a tiny size. The
first test runs it through the CLI in a fresh interpreter where every package other than torch,
triton, numpy, the standard library and this package is blocked (and sglang is importable in this
venv, so a stray import would be caught): the check must work where only those exist. The others
show that the check can fail: a wrong selector or MoE kernel, a served path that leaves its calls to
SGLang or answers differently under capture make it report the failure and exit 1. Part 5's own
premises are checked too: the plugin's routing imports and routes with SGLang blocked, and (where SGLang
is installed) the stand-in TopKConfig and the vanilla gates are SGLang's.
"""

from __future__ import annotations

import dataclasses
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
        assert r["served"]["correct"] and r["served"]["fallback"] == {} and r["served"]["mode"] == "cpu-call"
        assert r["served_us"] > 0 and r["speedup_served"] == pytest.approx(
            r["vanilla"]["us"] / (r["xshare"]["us"] + r["served_us"]))
    p5 = parts["served_path"]
    first = next(iter(gpu.CPU_SERVED_FAMILIES))
    assert [(r["family"], r["batch"], r["policy"]) for r in p5["rows"]] == [
        (f, b, "xshare") for f in gpu.CPU_SERVED_FAMILIES for b in (1, 4)] + [
        (first, 4, p) for p in ("lynx", "des_vote", "oea")]  # the torch-path policies' cost per call
    for r in p5["rows"]:  # the fused kernels route xshare (what 'auto' picks on CUDA); the others say why not
        assert r["backend"].startswith("triton") if r["policy"] == "xshare" else f"policy_{r['policy']}" in r["backend"]
    for r in p5["rows"]:
        family = gpu.CPU_SERVED_FAMILIES[r["family"]]
        assert (r["experts"], r["top_k"], r["width"]) == (family["experts"], family["top_k"],
                                                          family["top_k"] + family.get("shared", 0))
        assert r["correct"] is True and r["fallback"] == {} and not r["diffs"] and r["capture_error"] is None, r
        assert r["mode"] == "cpu-call" and r["vanilla_us"] > 0 and r["served_us"] > 0 and r["eager_us"] > 0
        assert r["served_over_vanilla"] == pytest.approx(r["served_us"] / r["vanilla_us"])
        assert r["metrics"]["correct"] is True and r["metrics"]["fallback"] == {} and r["metrics"]["served_us"] > 0
        assert "backend" in r and 0 <= r["changed_rows"] <= r["batch"]
    # the budget (E/4) really changed routings: the served path is not a pass-through
    assert sum(r["changed_rows"] for r in p5["rows"] if r["batch"] > 1) >= 5
    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert heading in md


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["bench", "gpu", "--cpu", "--out", str(tmp_path), *extra]


def test_a_wrong_selector_kernel_fails_the_check(tmp_path, monkeypatch):
    import xshare.selection as selection

    real = selection.select

    def wrong(*a, **kw):
        r = real(*a, **kw)
        if kw.get("backend") == "triton":  # the kernel's routing; the reference stays right
            r.topk_ids.copy_(r.topk_ids.flip(-1))  # same experts, wrong order
        return r

    monkeypatch.setattr(selection, "select", wrong)
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


# The plugin's routing modules without SGLang: only the standard library, torch and numpy at import, and
# one routing call each of a plain layer with a routed scaling factor (the adapter asks SGLang, lazily,
# whether it is already in the weights) and of DeepSeek-V3's router, with sglang and sgl_kernel blocked.
_NO_SGLANG = textwrap.dedent(r"""
    import importlib.abc, json, sys
    blocked = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in ("sglang", "sgl_kernel"):
                blocked.append(fullname)
                raise ModuleNotFoundError(f"blocked: {fullname}", name=fullname)
            return None

    sys.meta_path.insert(0, Block())
    import torch
    from xshare.sglang import layer
    from xshare.sglang import state as runtime
    from xshare.sglang.settings import PluginSettings
    from xshare.selection import SelectorConfig
    from xshare.bench.gpu.context import CPU_SERVED_FAMILIES
    from xshare.bench.gpu.standins import TopKConfigStandIn, topk_config, vanilla_gate

    out = {}
    selector = SelectorConfig(policy="xshare", budget=8, warmup_k=1)
    g = torch.Generator().manual_seed(0)
    cases = {"plain_scaled": TopKConfigStandIn(top_k=4, routed_scaling_factor=2.5),
             "deepseek_v3": topk_config(CPU_SERVED_FAMILIES["deepseek-v3"], torch.device("cpu"))}
    for name, cfg in cases.items():
        rt = runtime.ProcessState(PluginSettings(enabled=True, selector=selector, cpu_kernel=False))
        rt.push(runtime.ForwardState(mode="decode"))
        logits = torch.randn(8, 32, generator=g)
        ids, weights = vanilla_gate(cfg, logits)
        answer = layer.route(rt, {"topk_ids": ids, "topk_weights": weights, "router_logits": logits,
                                    "layer_id": 0, "num_token_non_padded": None}, cfg)
        snap = rt.stats.snapshot()
        out[name] = {"routed": answer is not None, "fallbacks": snap["fallbacks_total"], "applied": snap["applied"]}
    try:
        import sglang  # noqa: F401
        out["blocker"] = "sglang imported"
    except ModuleNotFoundError:
        out["blocker"] = "blocks"
    out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in ("sglang", "sgl_kernel"))
    print("RESULT " + json.dumps(out))
""")


def test_the_plugins_routing_imports_and_routes_without_sglang():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "overlay"))
    proc = subprocess.run([sys.executable, "-c", _NO_SGLANG], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert out["blocker"] == "blocks" and out["loaded"] == []
    for name in ("plain_scaled", "deepseek_v3"):
        assert out[name] == {"routed": True, "fallbacks": 0, "applied": 1}, (name, out, proc.stderr[-2000:])


def test_the_stand_in_topk_config_and_the_vanilla_gates_are_sglangs():
    """Where SGLang is installed: the stand-in has TopKConfig's fields (names, order, defaults), each family's
    vanilla gate routes as SGLang's own select_experts, and the adapter answers the stand-in as it answers
    the real config."""
    topk = require_module("sglang.srt.layers.moe.topk", "scripts/install_sglang_cpu.sh")
    from sglang.srt.configs.shared_experts import SharedExpertsConfig
    from sglang.srt.models.llama4 import Llama4MoE

    from xshare.bench.gpu.standins import SharedExpertsStandIn, TopKConfigStandIn, topk_config, vanilla_gate
    from xshare.selection import SelectorConfig
    from xshare.sglang import layer
    from xshare.sglang import state as runtime
    from xshare.sglang.settings import PluginSettings

    real = {f.name: f.default for f in dataclasses.fields(topk.TopKConfig) if f.init}
    mine = {f.name: f.default for f in dataclasses.fields(TopKConfigStandIn)}
    assert list(mine) == list(real)
    assert all(mine[n] == real[n] for n in real if n != "shared_experts"), {n: (mine[n], real[n]) for n in real}
    for n in SharedExpertsConfig.__struct_fields__:
        assert getattr(SharedExpertsStandIn(), n) == getattr(SharedExpertsConfig(), n), n
    for kw in ({"num_fused_shared_experts": 1}, {"num_fused_shared_experts": 1, "use_waterfill": True}):
        assert SharedExpertsStandIn(**kw).num_shared_topk_slots == SharedExpertsConfig(**kw).num_shared_topk_slots

    g = torch.Generator().manual_seed(5)
    selector = SelectorConfig(policy="xshare", budget=6, warmup_k=1)
    for name, family in gpu.CPU_SERVED_FAMILIES.items():
        cfg = topk_config(family, torch.device("cpu"), seed=1)
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        fields.update(torch_native=True, shared_experts=SharedExpertsConfig(
            num_fused_shared_experts=cfg.shared_experts.num_fused_shared_experts))
        if cfg.custom_routing_function is not None:
            fields["custom_routing_function"] = Llama4MoE.custom_routing_function
        sglang_cfg = topk.TopKConfig(**fields)
        x = torch.randn(16, family["experts"], generator=g) * 2
        want = topk.select_experts(torch.zeros(16, 8), x, sglang_cfg)
        ids, weights = vanilla_gate(cfg, x)
        k = family["top_k"]
        assert ids.shape == want.topk_ids.shape and ids.dtype == torch.int32, name
        mine_order, want_order = ids[:, :k].long().argsort(1), want.topk_ids[:, :k].long().argsort(1)
        assert torch.equal(ids[:, :k].long().gather(1, mine_order), want.topk_ids[:, :k].long().gather(1, want_order))
        torch.testing.assert_close(weights[:, :k].gather(1, mine_order),
                                   want.topk_weights[:, :k].float().gather(1, want_order), rtol=0, atol=1e-6)
        assert torch.equal(ids[:, k:], want.topk_ids[:, k:].to(torch.int32)), name  # the fused shared slot
        torch.testing.assert_close(weights[:, k:], want.topk_weights[:, k:].float())
        answers = []
        for c in (cfg, sglang_cfg):
            rt = runtime.ProcessState(PluginSettings(enabled=True, selector=selector, cpu_kernel=False))
            rt.push(runtime.ForwardState(mode="decode"))
            answers.append(layer.route(rt, {"topk_ids": ids.clone(), "topk_weights": weights.clone(),
                                              "router_logits": x, "layer_id": 0, "num_token_non_padded": None}, c))
        assert answers[0] is not None and answers[1] is not None, name
        assert torch.equal(answers[0]["topk_ids"], answers[1]["topk_ids"]), name
        assert torch.equal(answers[0]["topk_weights"], answers[1]["topk_weights"]), name


def _two_families(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Part 5 on one plain and one router-spec family (CI size), for the tests that only need its logic."""
    from xshare.bench.gpu import context

    few = {k: context.CPU_SERVED_FAMILIES[k] for k in ("qwen3-235b", "deepseek-v3")}
    monkeypatch.setattr(context, "CPU_SERVED_FAMILIES", few)
    return few


def test_a_served_path_left_to_sglang_fails_the_check_and_says_why(tmp_path, monkeypatch):
    from xshare.sglang import layer

    few = _two_families(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("the selector broke")

    monkeypatch.setattr(layer, "decide", broken)  # route catches it: the call falls back to SGLang's routing
    assert main(_args(tmp_path, "--parts", "served_path")) == 1
    p5 = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["served_path"]
    assert p5["status"] == "fail" and len(p5["rows"]) == 2 * len(few) + 3  # and the torch-path policies
    for r in p5["rows"]:
        assert r["correct"] is False and r["fallback"]["RuntimeError"] >= 1 and r["changed_rows"] is None
        assert r["served_us"] is None and r["served_over_vanilla"] is None  # no routing to time
        assert any("left the call to SGLang" in d for d in r["diffs"])
        assert any("the selector broke" in m for m in r["log"])
        assert r["metrics"]["correct"] is False
    assert "RuntimeError x" in (tmp_path / "gpu_check.md").read_text()


def test_a_captured_answer_unlike_the_eager_one_fails_the_check(tmp_path, monkeypatch):
    from xshare.sglang import layer

    _two_families(monkeypatch)
    real = layer.route

    def capture_differs(runtime, args, topk_config):
        out = real(runtime, args, topk_config)
        if out is not None and runtime.current is not None and runtime.current.capturing:
            out = dict(out, topk_ids=out["topk_ids"].flip(-1))  # same experts, another column order
        return out

    monkeypatch.setattr(layer, "route", capture_differs)
    assert main(_args(tmp_path, "--parts", "served_path")) == 1
    p5 = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["served_path"]
    assert p5["status"] == "fail" and p5["rows"]
    for r in p5["rows"]:
        assert r["correct"] is False and r["fallback"] == {}
        assert r["diffs"] and all("topk_ids differ" in d for d in r["diffs"])


def test_a_served_row_that_raises_is_reported_and_the_other_rows_still_run(tmp_path, monkeypatch):
    from xshare.bench.gpu import served

    few = _two_families(monkeypatch)
    real = served.ServedCall.fill

    def fill(self, num_tokens):
        if self.family is few["deepseek-v3"]:
            raise RuntimeError("no buffers for this router")
        real(self, num_tokens)

    monkeypatch.setattr(served.ServedCall, "fill", fill)
    assert main(_args(tmp_path, "--parts", "served_path")) == 1
    p5 = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["served_path"]
    assert p5["status"] == "fail" and [r["family"] for r in p5["rows"]] == [f for f in few for _ in (1, 4)] + [
        next(iter(few))] * 3  # and the torch-path policies on the first family
    for r in p5["rows"]:
        if r["family"] == "deepseek-v3":
            assert r["mode"] == "error" and r["correct"] is False and r["vanilla_us"] is None
            assert "RuntimeError: no buffers for this router" in r["diffs"][0] and r["metrics"]["mode"] == "error"
        else:
            assert r["correct"] is True and r["metrics"]["correct"] is True


def test_the_served_part_stops_at_its_time_share_and_keeps_its_rows(tmp_path, monkeypatch):
    from xshare.bench.gpu import served

    few = _two_families(monkeypatch)
    measured = []
    real = served.measure

    def counting(ctx, sc):
        measured.append(sc.batch)
        return real(ctx, sc)

    monkeypatch.setattr(served, "measure", counting)
    monkeypatch.setattr(gpu.Context, "past", lambda self, part: len(measured) >= 2)  # spent after the first row
    assert main(_args(tmp_path, "--parts", "served_path")) == 0
    p5 = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["served_path"]
    assert p5["status"] == "incomplete" and p5["skipped"] == 2 * len(few) - 1 + 3  # 3 torch-path policy rows
    assert len(p5["rows"]) == 1 and p5["rows"][0]["correct"] and p5["rows"][0]["metrics"]["correct"]


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
    assert main(_args(tmp_path, "--parts", "selector_vs_reference,selector_timing,served_path",
                      "--time-budget", "1e-6")) == 0
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["selector_vs_reference"]["status"] == "incomplete" and parts["selector_vs_reference"]["run"] == 0
    assert parts["selector_timing"]["status"] == "incomplete" and parts["selector_timing"]["skipped"] == 2
    assert parts["served_path"]["status"] == "incomplete" and parts["served_path"]["rows"] == []
    assert parts["served_path"]["skipped"] == 2 * len(gpu.CPU_SERVED_FAMILIES) + 3


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
