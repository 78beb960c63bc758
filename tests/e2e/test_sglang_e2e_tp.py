"""End to end with two ranks: ``--tp 2`` on the CPU (gloo). The plugin loads in both scheduler
processes, and both make identical routing decisions with no collective in the hook (the standard
dispatcher gives every rank the same tokens): their per-layer counters and order-sensitive
checksums of the chosen expert ids agree."""

import concurrent.futures as cf
import json

import pytest

from conftest import running
from xshare.sglang.server import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_two_ranks_load_the_plugin_and_decide_identically(tiny_model, tmp_path):
    stats_dir = tmp_path / "stats"
    srv = ServerProcess(tiny_model, xshare_args=["--xshare-policy", "xshare", "--xshare-budget", "4",
                                                 "--xshare-warmup-k", "0", "--xshare-stats-dir", str(stats_dir),
                                                 "--xshare-stats-every", "1"],
                        sglang_args=["--tp", "2"], log_path=tmp_path / "server.log", startup_timeout=400)
    with running(srv, "tp=2 server"):
        prompts = [f"def f{i}(x):" for i in range(6)]
        with cf.ThreadPoolExecutor(len(prompts)) as ex:
            outs = list(ex.map(lambda p: srv.generate(p, max_new_tokens=12), prompts))
        assert all(len(o["output_ids"]) == 12 for o in outs)
        schedulers = {pid for pid, title in srv.children() if "sglang::scheduler" in title}
        stats = [json.loads(p.read_text()) for p in sorted(stats_dir.glob("xshare-stats-*.json"))]
    assert len(stats) == 2 and {s["pid"] for s in stats} == schedulers
    assert sorted(s["rank"] for s in stats) == [0, 1]
    a, b = stats
    assert a["applied"] == b["applied"] > 0 and a["fallbacks_total"] == b["fallbacks_total"] == 0
    assert a["layers"] == b["layers"]  # identical decisions, counters and checksums, on both ranks
    for layer in a["layers"].values():
        assert layer["activated"] <= 4 * layer["calls"] < layer["vanilla_activated"]
