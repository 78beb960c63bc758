"""End to end: ``xshare`` with a budget >= E is token-identical to vanilla SGLang under greedy decoding.

Two real CPU servers, one after the other, on the same tiny model: vanilla (plugin loaded, selector
off) and xshare with budget 16 = E. The selector really runs in the second one (stats file), leaves
every token's experts unchanged (changed_tokens = 0 over batched decodes), and the generated token
ids are the same.
"""

import concurrent.futures as cf
import json

import pytest

from conftest import running
from xshare.models.tiny_moe import TinyMoeSpec
from xshare.sglang.server import ServerProcess

pytestmark = pytest.mark.e2e

SPEC = TinyMoeSpec()
PROMPTS = ["def hello(name):", "import os\nimport sys\n", "class Buffer:\n    def __init__(self", "for i in range(",
           "# load the config", "return self.value +", "print(\"batch", "while not done:"]


def _run(srv: ServerProcess) -> dict:
    with running(srv, str(srv.cmd[4:srv.cmd.index("--model-path")])):
        sequential = [srv.generate(p, max_new_tokens=16)["output_ids"] for p in PROMPTS[:4]]
        with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
            batched = list(ex.map(lambda p: srv.generate(p, max_new_tokens=16)["output_ids"], PROMPTS))
        completion = srv.completion(PROMPTS[0], max_tokens=16)["choices"][0]["text"]
    return {"sequential": sequential, "batched": batched, "completion": completion}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("xshare-identity")
    vanilla = _run(ServerProcess(tiny_model, xshare_args=["--xshare-disable", "--xshare-stats-dir",
                                                          str(work / "vanilla")],
                                 log_path=work / "vanilla.log"))
    stats_dir = work / "xshare"
    full = _run(ServerProcess(tiny_model, xshare_args=["--xshare-policy", "xshare", "--xshare-budget",
                                                       str(SPEC.num_experts), "--xshare-stats-dir", str(stats_dir),
                                                       "--xshare-stats-every", "1"],
                              log_path=work / "xshare.log"))
    stats = [json.loads(p.read_text()) for p in sorted(stats_dir.glob("xshare-stats-*.json"))]
    return {"vanilla": vanilla, "xshare": full, "stats": stats, "vanilla_stats": list((work / "vanilla").glob("*"))}


def test_budget_at_least_e_runs_the_selector_and_changes_no_expert(runs):
    assert len(runs["stats"]) == 1
    stats = runs["stats"][0]
    assert stats["applied"] > 0 and stats["fallbacks_total"] == 0
    for layer in stats["layers"].values():
        assert layer["changed_tokens"] == 0 and layer["activated"] == layer["vanilla_activated"]
        assert layer["tokens"] > layer["calls"]  # batched decodes were seen
    assert runs["vanilla_stats"] == []  # the disabled plugin installs no hooks and writes nothing


def test_greedy_tokens_are_identical_to_vanilla(runs):
    v, x = runs["vanilla"], runs["xshare"]
    assert x["sequential"] == v["sequential"]
    assert x["completion"] == v["completion"]
    assert all(len(ids) == 16 for ids in v["sequential"])


def test_batched_greedy_tokens_are_identical_to_vanilla(runs):
    v, x = runs["vanilla"], runs["xshare"]
    assert x["batched"] == v["batched"]
