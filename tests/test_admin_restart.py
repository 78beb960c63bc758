"""End to end: a config changed at run time survives a restart of the server, and what kill -9 of a scheduler does.

Two starts of the same ``xshare serve`` command (the tiny model, the same ``XSHARE_ADMIN_STATE_DIR``), as the Ray
launcher restarts a group and Kubernetes restarts a pod with the chart's state volume: the second start re-applies
the persisted config before serving. Then one scheduler is killed with SIGKILL while requests are in flight.
"""

import concurrent.futures as cf
import os
import signal
import time

import pytest

from conftest import alive
from xshare._http import request
from xshare.sglang.server import ServerProcess, group_processes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "restart-admin-token"


def server(model, work):
    return ServerProcess(model, xshare_args=["--xshare-policy", "xshare", "--xshare-budget", "8"],
                         env={"XSHARE_ADMIN_TOKEN": TOKEN, "XSHARE_ADMIN_STATE_DIR": str(work / "state")},
                         log_path=work / f"server-{time.monotonic_ns()}.log")


def test_a_tuned_config_survives_a_restart_and_kill_9_ends_the_whole_server(tiny_model, tmp_path):
    first = server(tiny_model, tmp_path).start()
    try:
        status, reply = request(first.base_url + "/xshare/config", "PATCH", TOKEN, {"budget": 6, "warmup_k": 2})
        assert status == 200 and reply["consistent"], reply
        tuned, version = reply["config"], reply["version"]
    finally:
        assert not first.stop()
    second = server(tiny_model, tmp_path).start()
    try:
        status, cfg = request(second.base_url + "/xshare/config", "GET", TOKEN)
        print(f"\nafter the restart: v{cfg['version']} ({cfg['source']}), ranks "
              f"{[(r['rank'], r['version'], r['config']['budget']) for r in cfg['ranks']]}")
        assert status == 200 and cfg["source"] == "persisted" and cfg["consistent"]
        assert cfg["version"] == version and cfg["config"] == tuned
        assert all(r["config"] == tuned and r["source"] == "persisted" for r in cfg["ranks"])
        assert len(second.generate("def f(x):", max_new_tokens=4)["output_ids"]) == 4

        # kill -9 of the scheduler while serving: SGLang ends the whole server (no orphan), the requests in
        # flight fail rather than hang, and the persisted config is what the next start uses
        pgid = second.proc.pid
        scheduler = next(pid for pid, title in second.children() if "sglang::scheduler" in title)
        with cf.ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(second.generate, f"def g{i}(x):", max_new_tokens=64, ignore_eos=True)
                    for i in range(2)]
            time.sleep(0.5)
            os.kill(scheduler, signal.SIGKILL)
            t0 = time.monotonic()
            outcomes = []
            for f in futs:
                try:
                    outcomes.append(f"completed {len(f.result(timeout=120)['output_ids'])} tokens")
                except Exception as exc:  # noqa: BLE001 - what a client sees is the finding
                    outcomes.append(type(exc).__name__)
        while second.proc.poll() is None and time.monotonic() < t0 + 90:
            time.sleep(0.5)
        took = time.monotonic() - t0
        left = [p for p in group_processes(pgid) if alive(p)]
        print(f"kill -9 of scheduler {scheduler}: server exit code {second.proc.poll()} after {took:.1f} s, "
              f"requests in flight: {outcomes}, processes left: {left}")
        assert second.proc.poll() is not None and not left
        assert (tmp_path / "state" / "config.json").exists()
    finally:
        second.stop()
