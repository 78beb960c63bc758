"""The CPU test bed: the sgl_kernel stand-in, the stand-in coverage check, the torchvision import fix,
the pinned install script, patches/ and the tiny model builder."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SHIMS = ROOT / "overlay" / "cpu_shims"
PY = sys.executable


def _load_shim():
    spec = importlib.util.spec_from_file_location("sgl_kernel_repo_copy", SHIMS / "sgl_kernel" / "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_assign_req_to_token_pool_matches_a_reference_loop():
    k = _load_shim()
    g = torch.Generator().manual_seed(0)
    req_to_token = torch.zeros(6, 20, dtype=torch.int32)
    pool_idx = torch.tensor([4, 1, 3])
    start = torch.tensor([0, 5, 2])
    end = torch.tensor([3, 9, 2])  # the last request takes nothing
    out_cache_loc = torch.randint(100, 1000, (7,), generator=g)
    ref = req_to_token.clone()
    pos = 0
    for i in range(3):
        n = int(end[i] - start[i])
        ref[pool_idx[i], start[i]:end[i]] = out_cache_loc[pos:pos + n].to(torch.int32)
        pos += n
    k.assign_req_to_token_pool_cpu(pool_idx, req_to_token, start, end, out_cache_loc, 20)
    assert torch.equal(req_to_token, ref)


def test_copy_all_layer_kv_cache_reads_sources_before_writing():
    k = _load_shim()
    bufs = [torch.arange(40, dtype=torch.float32).reshape(10, 4), torch.arange(30, dtype=torch.bfloat16).reshape(10, 3)]
    before = [b.clone() for b in bufs]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in bufs], dtype=torch.int64)
    tgt, src = torch.tensor([1, 2, 7]), torch.tensor([2, 1, 9])  # rows 1 and 2 swap
    k.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for b, o in zip(bufs, before, strict=True):
        assert torch.equal(b[1], o[2]) and torch.equal(b[2], o[1]) and torch.equal(b[7], o[9])
        assert torch.equal(b[0], o[0]) and torch.equal(b[9], o[9])


def test_draft_model_entries_fail_loudly():
    k = _load_shim()
    with pytest.raises(NotImplementedError, match="build_tree_kernel_efficient_cpu"):
        k.build_tree_kernel_efficient_cpu()
    assert "draft model" in k.build_tree_kernel_efficient_cpu.XSHARE_UNSUPPORTED
    assert not hasattr(k.verify_tree_greedy_cpu, "XSHARE_UNSUPPORTED")  # NGRAM's ops are implemented


def test_installed_stand_ins_are_the_repo_files():
    import sgl_kernel
    import xshare_cpu_fixes

    installed = Path(sgl_kernel.__file__).parent
    for f in (SHIMS / "sgl_kernel").glob("*.py"):
        assert (installed / f.name).read_bytes() == f.read_bytes(), f"stale {f.name}: re-run the install script"
    assert Path(xshare_cpu_fixes.__file__).read_bytes() == (SHIMS / "xshare_cpu_fixes.py").read_bytes()


def test_cpu_check_passes_on_the_installed_sglang():
    r = subprocess.run([PY, "-m", "xshare.sglang.cpu_check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = re.search(r"provides all (\d+) CPU symbols", r.stderr)
    assert m and int(m.group(1)) >= 10


def test_cpu_check_names_a_missing_symbol(tmp_path):
    fake = tmp_path / "sglang"
    (fake / "srt").mkdir(parents=True)
    (fake / "srt" / "new_op.py").write_text(
        "from sglang.srt.utils import is_cpu\n_is_cpu = is_cpu()\n"
        "if _is_cuda:\n    from sgl_kernel import cuda_only_op\n"
        "elif _is_cpu:\n    from sgl_kernel import brand_new_op_cpu, copy_all_layer_kv_cache_cpu\n"
        "if _is_cpu and cpu_has_amx_support():\n    from sgl_kernel import amx_only_op\n")
    r = subprocess.run([PY, "-m", "xshare.sglang.cpu_check", "--sglang-dir", str(fake), "--stand-in", str(SHIMS)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "MISSING sgl_kernel symbol sgl_kernel.brand_new_op_cpu (imported at sglang/srt/new_op.py:6)" in r.stderr
    assert "copy_all_layer_kv_cache_cpu" not in r.stderr and "cuda_only_op" not in r.stderr
    assert "amx_only_op" not in r.stderr


def test_torchvision_and_sglang_import_beside_cpu_torch():
    code = ("import torch, torchvision.transforms, importlib.metadata as m; "
            "assert torch.version.cuda is None; print(m.version('sglang'), torchvision.__version__)")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "0.5.23"


def test_requirements_are_pinned():
    lines = [ln.strip() for ln in (ROOT / "requirements" / "sglang-cpu.txt").read_text().splitlines()]
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    assert len(reqs) > 40
    bad = [ln for ln in reqs if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+", ln)]
    assert not bad, f"unpinned requirements: {bad}"
    names = {ln.split("==")[0].lower().replace("_", "-") for ln in reqs}
    assert "torch" not in names and "sglang" not in names  # CPU torch comes from constraints; sglang --no-deps


def test_install_script_is_idempotent_and_quick_when_done():
    script = ROOT / "scripts" / "install_sglang_cpu.sh"
    first = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    t0 = time.monotonic()
    second = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already installed" in second.stderr
    assert time.monotonic() - t0 < 30


def test_patches_apply_cleanly_and_idempotently(tmp_path):
    spec = importlib.util.find_spec("sglang")
    installed = Path(next(iter(spec.submodule_search_locations)))
    rel = Path("sglang/srt/ray/scheduler_actor.py")
    site = tmp_path / "site"
    (site / rel.parent).mkdir(parents=True)
    shutil.copy(installed.parent / rel, site / rel)
    patch = ROOT / "patches" / "0001-ray-scheduler-actor-load-plugins.patch"
    if "xshare patch 0001" in (site / rel).read_text():  # start from the pristine file
        subprocess.run(["patch", "-d", str(site), "-p1", "-R", "-s", "-f"], stdin=patch.open(), check=True)
    pristine = (site / rel).read_text()
    assert "load_plugins" not in pristine
    apply = ROOT / "patches" / "apply.sh"
    check = subprocess.run(["bash", str(apply), "--check", "--site", str(site)], capture_output=True, text=True)
    assert check.returncode == 0 and "would apply" in check.stdout
    assert (site / rel).read_text() == pristine  # --check changes nothing
    r1 = subprocess.run(["bash", str(apply), "--site", str(site)], capture_output=True, text=True)
    assert r1.returncode == 0 and "applied" in r1.stdout, r1.stderr
    patched = (site / rel).read_text()
    assert "load_plugins()" in patched and patched.replace(
        "        # xshare patch 0001: load general plugins (entry points in sglang.srt.plugins) in the Ray\n"
        "        # scheduler actor, as run_scheduler_process does for spawned schedulers.\n"
        "        from sglang.srt.plugins import load_plugins\n\n        load_plugins()\n", "") == pristine
    compile(patched, str(rel), "exec")
    r2 = subprocess.run(["bash", str(apply), "--site", str(site)], capture_output=True, text=True)
    assert r2.returncode == 0 and "already applied" in r2.stdout
    assert (site / rel).read_text() == patched
    (site / rel).write_text(pristine.replace("dist_init_addr: Optional[str] = None,", "other: int = 0,"))
    r3 = subprocess.run(["bash", str(apply), "--site", str(site)], capture_output=True, text=True)
    assert r3.returncode == 1 and "does NOT apply" in r3.stderr
    # and the installed sglang carries the patch (the install script applies it)
    assert "xshare patch 0001" in (installed.parent / rel).read_text()


def test_tiny_model_is_deterministic_and_loadable(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from xshare.models.tiny_moe import TinyMoeSpec, build_tiny_moe, read_manifest

    a = build_tiny_moe(tmp_path / "a")
    b = build_tiny_moe(tmp_path / "b")
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma == mb and "model.safetensors" in ma["files"] and "tokenizer.json" in ma["files"]
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_moe(a) == a and (a / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    cfg = AutoConfig.from_pretrained(a)
    spec = TinyMoeSpec()
    assert cfg.architectures == ["Qwen3MoeForCausalLM"]
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers) == (spec.num_experts, spec.top_k, 2)
    tok = AutoTokenizer.from_pretrained(a)
    text = "def hello(name):\n    return name + 1"
    assert tok.decode(tok(text).input_ids) == text
    assert json.loads((a / "manifest.json").read_text())["spec"]["seed"] == 0
    with pytest.raises(FileExistsError):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "keep.txt").write_text("x")
        build_tiny_moe(tmp_path / "c")
    with pytest.raises(ValueError, match="top_k"):
        TinyMoeSpec(num_experts=4, top_k=8)


def test_cpu_check_cache_is_keyed_by_the_installation(tmp_path):
    from xshare.sglang import cpu_check

    cache = tmp_path / "cache.json"
    assert cpu_check.cached_missing_symbols(cache) == []
    data = json.loads(cache.read_text())
    assert data["key"]["sglang"] == "0.5.23" and data["key"]["stand_in"]
    # a cached answer is reused only for the same key
    data["missing"] = [{"module": "sgl_kernel", "name": "pretend_cpu", "where": "x.py:1"}]
    cache.write_text(json.dumps(data))
    assert [m.symbol for m in cpu_check.cached_missing_symbols(cache)] == ["sgl_kernel.pretend_cpu"]
    data["key"]["stand_in"] = "other"
    cache.write_text(json.dumps(data))
    assert cpu_check.cached_missing_symbols(cache) == []
