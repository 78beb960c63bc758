"""End to end: a real SGLang 0.5.23 server on the CPU with the plugin on (started once for the module).

Server: the tiny Qwen3-MoE model (16 experts, top-4, 2 MoE layers), ``xshare`` with budget 4 and no
warm-up, an injected selector fault every 7th call, the stats file written every forward and the
trace recorder on. Also: a bad setting makes the server refuse to start.
"""

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import free_port, group_processes, running
from xshare.eval.traces import load_trace
from xshare.models.tiny_moe import TinyMoeSpec
from xshare.sglang.server import ServerProcess

pytestmark = pytest.mark.e2e

BUDGET = 4
SPEC = TinyMoeSpec()
PROMPTS = [f"def {name}(x, y):\n    return" for name in ("add", "sub", "mul", "load", "save", "parse", "send", "read")]


@pytest.fixture(scope="module")
def server(tiny_model, workdir):
    with running(ServerProcess(
        tiny_model,
        xshare_args=["--xshare-policy", "xshare", "--xshare-budget", str(BUDGET), "--xshare-warmup-k", "0",
                     "--xshare-stats-dir", str(workdir / "stats"), "--xshare-stats-every", "1",
                     "--xshare-trace-dir", str(workdir / "traces"), "--xshare-trace-flush-tokens", "32",
                     "--xshare-trace-max-tokens", "2048"],
        env={"XSHARE_FAULT_INJECT": "every:7"},
        log_path=workdir / "server.log",
    )) as srv:
        yield srv


def stats_files(workdir):
    return sorted((workdir / "stats").glob("xshare-stats-*.json"))


def read_stats(workdir):
    files = stats_files(workdir)
    assert len(files) == 1, files  # one scheduler (TP 1)
    return json.loads(files[0].read_text())


def test_generate_and_completions_are_answered(server):
    out = server.generate(PROMPTS[0], max_new_tokens=12)
    assert len(out["output_ids"]) == 12 and out["meta_info"]["finish_reason"]["type"] == "length"
    comp = server.completion("import os\n", max_tokens=8)
    choice = comp["choices"][0]
    assert choice["finish_reason"] == "length" and isinstance(choice["text"], str) and choice["text"]
    assert comp["usage"]["completion_tokens"] == 8


def test_selector_runs_in_the_scheduler_process(server, workdir):
    server.generate(PROMPTS[1], max_new_tokens=8)
    stats = read_stats(workdir)
    pid = stats["pid"]
    assert pid != server.proc.pid  # not the launcher
    members = dict(server.children())
    assert pid in members and "sglang::scheduler" in members[pid]
    assert stats["applied"] > 0 and stats["policy"] == "xshare" and stats["budget"] == BUDGET
    assert stats["skipped"].get("mode_extend", 0) > 0  # prefill is left alone by default
    assert f"selector active in scheduler pid {pid}" in server.log_tail(10**7)
    from xshare.selection.backends.c.kernel import cpu_kernel_available

    if cpu_kernel_available():  # the CPU server routes through the C fast path (docs/kernel.md)
        assert "CPU selector kernel ready" in server.log_tail(10**7)


def test_activated_experts_drop_below_vanilla_in_batched_decode(server, workdir):
    before = read_stats(workdir)
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        outs = list(ex.map(lambda p: server.generate(p, max_new_tokens=24), PROMPTS))
    assert all(len(o["output_ids"]) == 24 for o in outs)
    after = read_stats(workdir)
    for layer, now in after["layers"].items():
        prev = before["layers"].get(layer, {"calls": 0, "activated": 0, "vanilla_activated": 0, "tokens": 0,
                                            "changed_tokens": 0})
        calls = now["calls"] - prev["calls"]
        tokens = now["tokens"] - prev["tokens"]
        assert calls > 0 and tokens / calls > 1.5, "decode batches were not batched"
        mean_active = (now["activated"] - prev["activated"]) / calls
        mean_vanilla = (now["vanilla_activated"] - prev["vanilla_activated"]) / calls
        assert mean_active <= BUDGET < mean_vanilla, (layer, mean_active, mean_vanilla)
        assert now["changed_tokens"] > prev["changed_tokens"]
        print(f"layer {layer}: activated experts per decode batch {mean_vanilla:.2f} -> {mean_active:.2f} "
              f"({tokens / calls:.1f} tokens per batch)")


def test_injected_faults_fall_back_and_every_request_succeeds(server, workdir):
    with cf.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda p: server.generate(p, max_new_tokens=10), PROMPTS[:4]))
    assert all(len(o["output_ids"]) == 10 for o in outs)
    stats = read_stats(workdir)
    assert stats["fallbacks"].get("InjectedFault", 0) > 0 and stats["applied"] > 0
    assert stats["fallbacks_total"] == stats["fallbacks"]["InjectedFault"]
    assert server.log_tail(10**7).count("xshare: selector failed (InjectedFault") == 1  # logged once


def test_trace_recorder_writes_replayable_shards(server, workdir):
    with cf.ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda p: server.generate(p, max_new_tokens=16), PROMPTS[4:]))
    shards = sorted((workdir / "traces").glob("trace-r0-p*.npz"))
    assert shards, "no trace shard written"
    total = 0
    for path in shards:
        data = np.load(path)
        meta = json.loads(str(data["meta"]))
        logits = data["router_logits"]
        num_layers, num_tokens, num_experts = logits.shape
        assert (num_layers, num_experts, meta["top_k"]) == (2, SPEC.num_experts, SPEC.top_k)
        assert logits.dtype == np.float16 and meta["num_experts"] == num_experts
        probs = torch.softmax(torch.from_numpy(logits.astype(np.float32)), -1)
        w, ids = torch.topk(probs, SPEC.top_k, -1)
        assert np.array_equal(data["topk_ids"], ids.numpy().astype(np.int16))
        assert np.allclose(data["topk_weights"], w.numpy(), atol=1e-6)
        for key in ("seq_ids", "positions", "batch_ids"):
            assert data[key].shape == (num_tokens,)
        assert len(np.unique(data["batch_ids"])) < num_tokens  # batches of several tokens were recorded
        total += num_tokens
        trace = load_trace(path)
        assert trace.num_tokens == num_tokens and trace.describe()["files"][0]["router_logits"]
    assert total >= 32


def test_bad_setting_refuses_to_start(tiny_model, workdir):
    """Plain sglang (not xshare serve): the plugin stops the launcher, naming the variable."""
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "XSHARE_ENABLE": "1", "XSHARE_POLICY": "no_such_policy"}
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tiny_model), "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(free_port()), "--attention-backend", "torch_native",
           "--max-total-tokens", "4096"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "xshare: refusing to start: XSHARE_POLICY='no_such_policy': unknown policy" in out
    time.sleep(1)
    assert group_processes(proc.pid) == []


def test_server_stops_cleanly(server):
    pgid = server.proc.pid
    assert len(group_processes(pgid)) >= 2  # launcher + scheduler + detokenizer
    leftovers = server.stop()
    assert leftovers == [] and group_processes(pgid) == []
    assert server.proc.returncode is not None
