"""Ranks that route the same rows (attention DP over a TP MoE) take a config change at the same step.

Each DP rank's event loop handles the admin message at its own step, so without a common step the ranks
would route one or more forwards under different configs (and the MoE reduction would sum partials of
different routings). The HTTP process stamps the message with a forward count past every rank's
(:func:`xshare.sglang.admin.fanout.activation_forward`); each rank checks the config at once and stages
it, and the forward hook's boundary step (``sync_knobs``) puts it in force at that count. Simulated DP
ranks here: real process states, the real message handler and knobs, forwards counted in lockstep.
"""

import pytest

from xshare.selection import SelectorConfig
from xshare.sglang.admin import common
from xshare.sglang.admin.config import config_of
from xshare.sglang.admin.fanout import activation_forward
from xshare.sglang.admin.scheduler import handle_message, rank_status
from xshare.sglang.settings import PluginSettings
from xshare.sglang.state import ProcessState

E, K = 32, 4


def _rank(forwards: int) -> ProcessState:
    rt = ProcessState(PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare", budget=8)))
    rt.channel_key = "key"
    rt.shared_rows = True
    rt.stats.forwards = forwards
    return rt


def _message(rt: ProcessState, at_forward: int | None, budget: int = 12) -> str:
    config = {**config_of(rt.settings), "budget": budget}
    return common.encode_message(1, config, "admin change", "key", at_forward=at_forward)


def _run(ranks: dict[str, ProcessState], deliver: dict[str, int], at_forward: int | None, steps: int) -> dict:
    """Forwards in lockstep from step 0; the message reaches each rank's event loop at its step in
    ``deliver``. Returns, per rank, the budget its device knobs held in each forward."""
    seen: dict[str, list[int]] = {name: [] for name in ranks}
    for step in range(steps):
        for name, rt in ranks.items():
            if deliver[name] == step:
                assert handle_message(rt, _message(rt, at_forward)) is None
            rt.sync_knobs()  # the forward hook's boundary step, before the model runs
            knobs = rt.knobs_for(rt.settings.selector, E, K, "cpu")
            seen[name].append(int(knobs.budget))
            rt.stats.count_forward()
    return seen


def test_stamped_ranks_switch_at_the_same_step_and_unstamped_ones_do_not():
    ranks = {"dp0": _rank(0), "dp1": _rank(0)}
    at = activation_forward([rank_status(rt) for rt in ranks.values()])
    assert at == common.ACTIVATION_MARGIN  # both at forward 0: the margin past it
    seen = _run(ranks, {"dp0": 3, "dp1": 5}, at, at + 4)
    assert seen["dp0"] == seen["dp1"] == [8] * at + [12] * 4
    before = {"dp0": _rank(0), "dp1": _rank(0)}
    seen = _run(before, {"dp0": 3, "dp1": 5}, None, 8)  # at once: two steps under different budgets
    assert seen["dp0"] != seen["dp1"] and seen["dp0"][3:5] == [12, 12] and seen["dp1"][3:5] == [8, 8]


def test_a_staged_config_is_reported_as_the_ranks_with_its_step():
    rt = _rank(10)
    assert handle_message(rt, _message(rt, 40)) is None
    assert rt.settings.selector.budget == 8 and rt.version == 0  # not in force yet
    status = rank_status(rt)
    assert status["version"] == 1 and status["config"]["budget"] == 12 and status["at_forward"] == 40
    assert status["forwards"] == 10 and status["shared_rows"] is True
    rt.stats.forwards = 40
    rt.sync_knobs()
    assert rt.settings.selector.budget == 12 and rt.version == 1 and rt.staged is None
    assert rank_status(rt)["at_forward"] is None


def test_a_rank_past_the_step_switches_at_once_and_a_refused_change_keeps_the_staged_one(monkeypatch, caplog):
    rt = _rank(50)
    assert handle_message(rt, _message(rt, 40)) is None
    assert rt.settings.selector.budget == 12 and rt.staged is None
    assert "10 forwards after the step" in caplog.text
    monkeypatch.setenv(common.FAULT_ENV, "refuse:budget=6")
    other = _rank(0)
    assert handle_message(other, _message(other, 40, budget=10)) is None and other.staged is not None
    assert handle_message(other, _message(other, 60, budget=6)) is not None  # refused on this rank
    assert other.staged is not None and other.staged.settings.selector.budget == 10  # the staged change stays


def test_no_shared_rows_no_step_and_bad_steps_are_refused():
    assert activation_forward([{"forwards": 7, "shared_rows": False}, {"forwards": 9}]) is None
    assert activation_forward([{"forwards": 7, "shared_rows": True}, {"forwards": 9}]) == 9 + common.ACTIVATION_MARGIN
    text = common.encode_message(1, {"budget": 6}, "admin change", "k", at_forward=5)
    assert common.decode_message(text, "k", verify=True)["at_forward"] == 5
    assert "at_forward" not in common.decode_message(common.encode_message(1, {}, "s", "k"), "k", verify=True)
    for bad in (-1, "5", True):
        body = f'{{"at_forward":{__import__("json").dumps(bad)},"config":{{}},"source":"s","version":1}}'
        with pytest.raises(ValueError, match="at_forward"):
            common.decode_message(f"{common.CONTROL_KEY} 00 {body}", "k", verify=False)
