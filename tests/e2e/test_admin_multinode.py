"""End to end: the admin endpoint on a two-node group without shared storage (one group for the module).

Two ``xshare serve --tp 2 --nnodes 2 --node-rank {0,1} --dist-init-addr 127.0.0.1:PORT`` processes on loopback,
one scheduler rank each, the trained tiny model, each node with its own ``XSHARE_ADMIN_STATE_DIR``; node 1 refuses
any config with budget 13 (``XSHARE_FAULT_ADMIN``, in its environment only). The config reaches node 1's rank
through SGLang's own control path (TP rank 0 broadcasts it over the CPU group), not through a file.
"""

import concurrent.futures as cf
import json
import os
import subprocess
import sys

import pytest

from conftest import alive, running
from xshare._http import request
from xshare.sglang.server import ServerProcess, free_port, group_processes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "two-node-admin-token"
XSHARE = ["--xshare-policy", "xshare", "--xshare-budget", "8", "--xshare-warmup-k", "1"]


@pytest.fixture(scope="module")
def group(trained_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("xshare-two-nodes")
    (work / "token").write_text(TOKEN)
    dist = ["--tp", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    admin = {"XSHARE_ADMIN_TOKEN_FILE": str(work / "token")}
    node1_log = open(work / "node1.log", "wb")  # noqa: SIM115 - closed below
    node1 = subprocess.Popen(
        [sys.executable, "-m", "xshare.cli", "serve", *XSHARE, "--model-path", str(trained_model), "--device", "cpu",
         "--host", "127.0.0.1", "--port", str(free_port()), "--skip-server-warmup", *dist, "--node-rank", "1"],
        env={**os.environ, **admin, "XSHARE_ADMIN_STATE_DIR": str(work / "node1-state"),
             "XSHARE_FAULT_ADMIN": "refuse:budget=13"},
        stdout=node1_log, stderr=subprocess.STDOUT, start_new_session=True)
    node0 = ServerProcess(trained_model, xshare_args=XSHARE, sglang_args=[*dist, "--node-rank", "0"],
                          env={**admin, "XSHARE_ADMIN_STATE_DIR": str(work / "node0-state")},
                          log_path=work / "node0.log", startup_timeout=500)
    try:
        with running(node0, "two-node group (node 0)") as srv:
            srv.work, srv.node1 = work, node1
            yield srv
    finally:
        node1.terminate()
        try:
            node1.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(node1.pid, 9)
            node1.wait(30)
        node1_log.close()
        left = [p for p in group_processes(node1.pid) if alive(p)]
        assert not left, f"node 1 left processes behind: {left}"


def call(srv, method, path, body=None, token=TOKEN):
    return request(srv.base_url + path, method, token, body, 120)


def ranks_of(reply):
    return [(r["rank"], r["version"], r["config"]["budget"], r["source"]) for r in reply["ranks"]]


def test_every_rank_of_both_nodes_is_listed_at_start(group):
    status, cfg = call(group, "GET", "/xshare/config")
    print(f"\nat start: HTTP {status}, version {cfg['version']} ({cfg['source']}), ranks {ranks_of(cfg)}")
    assert status == 200 and cfg["expected_ranks"] == 2 and cfg["consistent"]
    assert [r["rank"] for r in cfg["ranks"]] == [0, 1] and {r["tp_rank"] for r in cfg["ranks"]} == {0, 1}
    assert len({r["pid"] for r in cfg["ranks"]}) == 2
    assert not (group.work / "node1-state").exists()  # node 1 writes no state: nothing needs shared storage


def test_patch_applies_on_both_nodes(group):
    status, reply = call(group, "PATCH", "/xshare/config", {"budget": 6})
    print(f"\nPATCH budget 6: HTTP {status}, version {reply['version']}, ranks {ranks_of(reply)}")
    assert status == 200 and reply["consistent"], reply
    assert [(r["rank"], r["version"], r["config"]["budget"]) for r in reply["ranks"]] == [
        (0, reply["version"], 6), (1, reply["version"], 6)]
    _, cfg = call(group, "GET", "/xshare/config")
    assert cfg["ranks"] == reply["ranks"] and cfg["source"] == "admin change"
    persisted = json.loads((group.work / "node0-state" / "config.json").read_text())
    assert persisted["version"] == reply["version"] and persisted["config"]["budget"] == 6
    with cf.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: group.generate(f"def f{i}(x):", max_new_tokens=8, ignore_eos=True), range(4)))
    assert all(len(o["output_ids"]) == 8 for o in outs)


def test_a_change_refused_on_node_1_reverts_every_rank_with_409(group):
    _, before = call(group, "GET", "/xshare/config")
    status, reply = call(group, "PATCH", "/xshare/config", {"budget": 13})
    print(f"\nPATCH budget 13 (refused on node 1): HTTP {status}: {reply['detail']}; ranks {ranks_of(reply)}")
    assert status == 409 and reply["reverted"] is True, reply
    assert "rank 1" in reply["detail"] and "XSHARE_FAULT_ADMIN" in reply["detail"]
    _, after = call(group, "GET", "/xshare/config")
    assert after["version"] == before["version"] and after["consistent"]
    assert [(r["rank"], r["version"], r["config"]) for r in after["ranks"]] == [
        (r["rank"], before["version"], before["config"]) for r in before["ranks"]]
    out = group.generate("def g(x):", max_new_tokens=6, ignore_eos=True)
    assert len(out["output_ids"]) == 6 and group.node1.poll() is None
