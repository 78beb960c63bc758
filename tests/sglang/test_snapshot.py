"""The device figures reach the host without stalling a forward (``xshare.sglang.observe.snapshot``,
``SelectorStats.collect``, ``report.forward_ended`` / ``report.scheduler_idle``).

* :class:`Snapshot` alone: an accumulator is drained in stream order, so a write landing after the copy is
  kept for the next snapshot; nothing starts while a snapshot is in flight; nothing is read before it arrived.
* :class:`StreamCopier` with a fake CUDA stream/event pair: the side stream waits on an event recorded on the
  forward's stream after the device copies, the completion event is queried, never waited on.
* The serving path over many forwards and flushes (real bookkeeping on CPU tensors, a real ProcessState,
  ``report.forward_ended``), with a copier whose transfers arrive later, as a side stream's do: every window
  row and every count reaches the flushes exactly once, the same as with copies that arrive at once (what
  the CPU runs, and what the synchronous reads used to give); a flush reports what the previous snapshot
  brought (one flush late); a snapshot still on its way is neither read nor replaced, and what later
  forwards add waits on the device; the scheduler going idle reads everything exactly.
* On ``meta`` tensors, under the host-transfer detector of test_capture_safety.py: the whole
  forward-boundary path (stats file, metrics flush) reads no device value. Meta tensors cannot be copied
  to the host at all, so there the copier is a stand-in that hands back host zeros; the copy it stands for
  is the side stream's (above).
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from xshare.selection import Placement, SelectorConfig, select
from xshare.sglang import layer as routing
from xshare.sglang import state as rt
from xshare.sglang.observe import report
from xshare.sglang.observe.metrics import Exporter
from xshare.sglang.observe.snapshot import Arrived, Snapshot, StreamCopier
from xshare.sglang.settings import PluginSettings

E, K, T, LAYERS = 32, 4, 12, (1, 2, 3)
CONFIG = SelectorConfig(policy="xshare", budget=6, warmup_k=1)


# -- stand-ins for the CUDA side --------------------------------------------------------------------------
class _Later:
    """A transfer that arrives when its copier delivers it (or when waited on)."""

    def __init__(self, host: list[torch.Tensor]) -> None:
        self.host, self.arrived = host, False

    def done(self) -> bool:
        return self.arrived

    def wait(self) -> None:
        self.arrived = True


class _SlowCopier:
    """Stands in for the side stream: the copies are made when asked (as the stream would, after the event),
    and arrive at :meth:`deliver`. Checks that no transfer starts while an earlier one has not arrived."""

    def __init__(self) -> None:
        self.transfers: list[_Later] = []

    def __call__(self, copies: list[torch.Tensor]) -> _Later:
        assert all(t.arrived for t in self.transfers), "a snapshot started while one was in flight"
        self.transfers.append(_Later([c.clone() for c in copies]))
        return self.transfers[-1]

    def deliver(self) -> None:
        for t in self.transfers:
            t.arrived = True


def test_a_drained_accumulator_keeps_what_lands_after_the_copy():
    copier = _SlowCopier()
    snap = Snapshot(lambda device: copier)
    acc, ring = torch.tensor([3, 4]), torch.tensor([7.0])
    assert snap.start([acc, ring], [True, False])
    assert acc.tolist() == [0, 0] and ring.tolist() == [7.0]  # drained / only copied
    acc += 10  # later forwards write before the snapshot has arrived
    ring += 1
    assert snap.busy and not snap.ready()
    with pytest.raises(RuntimeError, match="nothing has arrived"):
        snap.take()
    assert not snap.start([acc, ring], [True, False])  # one at a time: nothing in flight is overwritten
    assert acc.tolist() == [10, 10] and len(copier.transfers) == 1  # the refused start drained nothing
    copier.deliver()
    got = snap.take()
    assert [t.tolist() for t in got] == [[3, 4], [7.0]] and not snap.busy
    assert snap.start([acc, ring], [True, False])
    copier.deliver()
    assert [t.tolist() for t in snap.take()] == [[10, 10], [8.0]] and acc.tolist() == [0, 0]


def test_a_copier_that_fails_drains_nothing():
    def broken(copies: list[torch.Tensor]) -> Arrived:
        raise RuntimeError("injected: the copy could not be issued")

    snap = Snapshot(lambda device: broken)
    acc = torch.tensor([5, 6])
    with pytest.raises(RuntimeError, match="injected"):
        snap.start([acc], [True])
    assert acc.tolist() == [5, 6] and not snap.busy  # kept for the next snapshot


def test_sources_on_several_devices_come_back_in_their_order():
    copiers = {"cpu": _SlowCopier(), "meta": lambda copies: Arrived([torch.zeros(c.shape) for c in copies])}
    snap = Snapshot(lambda device: copiers[device.type])
    a, m, b = torch.tensor([1.0]), torch.ones(2, device="meta"), torch.tensor([2.0, 3.0])
    assert snap.start([a, m, b], [False, True, False])
    assert not snap.ready()  # the CPU part has not arrived, the meta part has
    copiers["cpu"].deliver()
    got = snap.take()
    assert [t.tolist() for t in got] == [[1.0], [0.0, 0.0], [2.0, 3.0]]
    assert not snap.start([], [])  # nothing to snapshot


class _Stream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_event(self, event: _Event) -> None:
        self.log.append(("wait", self.name, event.id))


class _Event:
    def __init__(self, cuda: _FakeCuda) -> None:
        self.cuda, self.id = cuda, cuda.events
        cuda.events += 1

    def record(self, stream: _Stream) -> None:
        self.cuda.log.append(("record", self.id, stream.name))

    def query(self) -> bool:
        self.cuda.log.append(("query", self.id))
        return self.cuda.complete

    def synchronize(self) -> None:
        self.cuda.log.append(("synchronize", self.id))
        self.cuda.complete = True


class _FakeCuda:
    """The names of ``torch.cuda`` that :class:`StreamCopier` uses, recording what is asked of them."""

    def __init__(self) -> None:
        self.log: list = []
        self.events, self.complete = 0, False
        self.forward = _Stream("forward", self.log)

    def Stream(self, device: torch.device) -> _Stream:  # noqa: N802 - torch.cuda's name
        return _Stream("side", self.log)

    def current_stream(self, device: torch.device) -> _Stream:
        return self.forward

    def Event(self) -> _Event:  # noqa: N802
        return _Event(self)

    @contextlib.contextmanager
    def stream(self, stream: _Stream):
        self.log.append(("enter", stream.name))
        yield
        self.log.append(("exit", stream.name))


def test_the_stream_copier_orders_the_copy_after_the_snapshot_and_never_waits():
    cuda = _FakeCuda()
    snap = Snapshot(lambda device: StreamCopier(device, cuda=cuda, pin=False))
    acc = torch.arange(4)
    assert snap.start([acc], [True])
    # an event after the device copies on the forward's stream; the side stream waits on it, copies, and
    # records the completion event
    assert cuda.log == [("record", 0, "forward"), ("wait", "side", 0), ("enter", "side"), ("record", 1, "side"),
                        ("exit", "side")]
    assert not snap.ready() and cuda.log[-1] == ("query", 1)
    cuda.complete = True
    assert snap.ready()
    assert snap.take()[0].tolist() == [0, 1, 2, 3] and acc.tolist() == [0, 0, 0, 0]
    assert not any(entry[0] == "synchronize" for entry in cuda.log)  # never waited on
    assert snap.start([acc], [True])
    snap.wait()  # the idle path's wait is the completion event's
    assert cuda.log[-1] == ("synchronize", 3) and snap.ready()


# -- the serving path ----------------------------------------------------------------------------------
class _Sink:
    """Stands in for the exporter (the state's MetricsSink): what each flush was handed (host figures)."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.figures: list[dict] = []

    def flush(self, state: rt.ProcessState) -> None:
        st = state.stats
        self.rows.append(st.drain_window(fresh=False))
        sums = st.fold(fresh=False)
        modes = {m: {k: v for k, v in f.items() if k not in ("calls", "skipped")}
                 for m, f in st.mode_report(fold=False).items()}
        self.figures.append({"layers": sums, "cap_bound": st.cap_bound_calls(sums),
                             "short_rows": st.totals.short_rows, "modes": modes})

    def config_changed(self, state: rt.ProcessState) -> None:
        return None

    def config_change(self, result: str) -> None:
        return None


def _runtime(copier: _SlowCopier | None = None, stats_dir=None, sink=None) -> rt.ProcessState:
    settings = PluginSettings(enabled=True, sim_gpus=4, metrics_flush_every=3, stats_dir=stats_dir, stats_every=2,
                              selector=CONFIG)
    runtime = rt.ProcessState(settings)
    runtime.enable_observability(sink if sink is not None else _Sink())
    if copier is not None:
        runtime.stats.transfers = Snapshot(lambda device: copier)
    return runtime


def _forward(runtime: rt.ProcessState, step: int) -> None:
    """One forward: the bookkeeping of a few MoE layer calls (every kind of device figure), then its end."""
    state = rt.ForwardState(mode="extend" if step % 5 == 4 else "decode")
    runtime.push(state)
    gen = torch.Generator().manual_seed(step)
    placement = Placement.contiguous(E, 4)
    st = runtime.stats
    for layer in LAYERS:
        logits = torch.randn(T, E, generator=gen)
        r = select(logits, K, CONFIG)
        st.record_call(layer, logits=logits, engine_ids=torch.topk(logits, K).indices, chosen_ids=r.topk_ids,
                       active=r.active, num_tokens=T - step % 3, placement=placement,
                       cap_bound=torch.tensor(step % 2 == 0))
        st.record_requests(torch.arange(T) // 3, r.topk_ids, E, 5)
    st.record_short_rows(torch.tensor(step % 3))
    st.record_cap_bound(torch.tensor(step % 4 == 0))
    runtime.pop()
    report.forward_ended(runtime, state)


def _side_by_side(a: rt.ProcessState, b: rt.ProcessState, steps: range) -> None:
    """The same forwards on two runtimes (one copier late, one at once)."""
    for step in steps:
        _forward(a, step)
        _forward(b, step)


def _late_pair() -> tuple[_SlowCopier, rt.ProcessState, rt.ProcessState]:
    late = _SlowCopier()
    return late, _runtime(late), _runtime()


def _counters(snap: dict) -> dict:
    return {k: v for k, v in snap.items() if k not in ("pid", "time", "uptime_s")}


def test_every_figure_reaches_the_flushes_once_when_the_copies_arrive_late(tmp_path):
    late, at_once = _SlowCopier(), None
    a = _runtime(late, tmp_path / "a")
    b = _runtime(at_once, tmp_path / "b")  # copies arrive as made: the CPU's path, exact at every flush
    gen = torch.Generator().manual_seed(0)
    for step in range(40):
        _forward(a, step)
        _forward(b, step)
        if step < 30 and torch.rand((), generator=gen) < 0.4:  # the side stream finishes now and then
            late.deliver()
    # forwards 30..39: nothing arrived, so no snapshot has started since (one at a time), and what those
    # forwards added waits in the device buffers
    assert len(late.transfers) < 40 and a.stats.transfers.busy
    assert int(sum(p.sums[:, 0].sum() for p in a.stats._pages["cpu"])) >= 3 * 8
    assert _counters(a.stats.snapshot(fresh=False)) != _counters(b.stats.snapshot(fresh=False))
    report.scheduler_idle(a)  # the scheduler goes idle: read exactly (waits), flushed, stats file written
    report.scheduler_idle(b)
    assert len(a.metrics.rows) == len(b.metrics.rows)
    rows_a, rows_b = torch.cat(a.metrics.rows), torch.cat(b.metrics.rows)
    assert rows_a.shape == rows_b.shape == (40 * len(LAYERS), 9 + 2 * 4)  # every row once, in order
    assert torch.equal(rows_a, rows_b)
    assert a.metrics.figures[-1] == b.metrics.figures[-1]
    assert _counters(a.stats.snapshot()) == _counters(b.stats.snapshot())
    files = [json.loads(next((tmp_path / d).glob("xshare-stats-*.json")).read_text()) for d in "ab"]
    assert _counters(files[0]) == _counters(files[1])
    assert files[0]["applied"] == 40 * len(LAYERS) and files[0]["short_rows"] == sum(s % 3 for s in range(40))
    transfers = len(late.transfers)
    report.scheduler_idle(a)  # idle again with no forward since: nothing is read
    assert len(late.transfers) == transfers


def test_a_flush_reports_what_the_previous_snapshot_brought():
    late = _SlowCopier()
    seen_a, seen_b = [], []
    a = _runtime(late, sink=Exporter(0, prometheus=False, ep=(1, 0, True), on_flush=seen_a.append))
    b = _runtime(sink=Exporter(0, prometheus=False, ep=(1, 0, True), on_flush=seen_b.append))
    for step in range(24):
        _forward(a, step)
        _forward(b, step)
        late.deliver()  # each side-stream copy is done by the next forward boundary
    assert len(seen_a) == len(seen_b) == 8
    assert seen_a[0]["rows"] == 0  # the first flush started the first snapshot: nothing had arrived
    for k in range(1, 8):  # flush k reports what flush k - 1 reported with copies that arrive at once
        for key in ("rows", "layers", "mass_cap_bound"):
            assert seen_a[k][key] == seen_b[k - 1][key], (k, key)
        for mode, fig in seen_b[k - 1]["modes"].items():
            assert {n: v for n, v in seen_a[k]["modes"][mode].items() if n not in ("calls", "skipped")} == \
                {n: v for n, v in fig.items() if n not in ("calls", "skipped")}, (k, mode)


def test_a_snapshot_still_on_its_way_is_not_read_and_nothing_is_lost():
    late, a, b = _late_pair()
    _side_by_side(a, b, range(12))
    assert len(late.transfers) == 1 and not late.transfers[0].arrived  # started at the first flush, only
    assert [r.shape[0] for r in a.metrics.rows] == [0] * 4 and a.metrics.figures[-1]["layers"] == {}
    late.deliver()
    _side_by_side(a, b, range(12, 15))  # up to the next flush: the first snapshot has arrived, the second starts
    assert len(late.transfers) == 2 and len(a.metrics.rows) == 5
    assert a.metrics.rows[-1].shape[0] == 3 * len(LAYERS)  # forwards 0..2, drained at the first flush
    report.scheduler_idle(a)
    report.scheduler_idle(b)
    assert torch.equal(torch.cat(a.metrics.rows), torch.cat(b.metrics.rows))
    assert a.metrics.figures[-1] == b.metrics.figures[-1]


def test_an_admin_change_flushes_exactly_what_ran_under_the_old_config():
    late, a, b = _late_pair()
    _side_by_side(a, b, range(5))
    a.flush_metrics()  # the admin path, before it applies a change: waits for the device
    b.flush_metrics()
    assert a.metrics.figures[-1] == b.metrics.figures[-1]
    assert sum(r.shape[0] for r in a.metrics.rows) == 5 * len(LAYERS)


# -- meta: the forward boundary reads no device value ----------------------------------------------------
def test_the_forward_boundary_reads_no_device_value(tmp_path):
    from test_capture_safety import _hook_args, _topk_config, forbid_host_transfers

    copies: list[list[tuple]] = []

    def stand_in(copied: list[torch.Tensor]) -> Arrived:  # meta has no data to copy: host zeros
        copies.append([tuple(c.shape) for c in copied])
        return Arrived([torch.zeros(c.shape, dtype=c.dtype) for c in copied])

    cfg, e, _ = _topk_config("deepseek_v3")
    settings = PluginSettings(enabled=True, sim_gpus=4, metrics_flush_every=1, stats_dir=tmp_path, stats_every=1,
                              selector=SelectorConfig(policy="xshare_spec", budget=max(2, e // 4), warmup_k=1))
    runtime = rt.ProcessState(settings)
    runtime.enable_observability(Exporter(0, prometheus=False, ep=(1, 0, True)))
    runtime.stats.transfers = Snapshot(lambda device: stand_in)
    transfers = []
    for _ in range(3):
        state = rt.ForwardState(mode="decode", tokens_per_req=2)
        runtime.push(state)
        assert routing.route(runtime, _hook_args(cfg, e, False), cfg) is not None, dict(runtime.stats.fallbacks)
        runtime.pop()
        with forbid_host_transfers() as log:
            report.forward_ended(runtime, state)
        transfers += log
    assert not transfers, "\n".join(map(str, transfers))
    assert "metrics_flush" not in runtime._logged and runtime.metrics.last.get("modes")  # the flush ran
    # each boundary: one snapshot of every device figure: the sums page, the request sums, the short rows,
    # the window ring and its index
    assert copies == [[(64, 7), (4,), (), (8192, 9 + 2 * 4), ()]] * 3
    assert next(tmp_path.glob("xshare-stats-*.json")).exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_forward_boundary_leaves_the_stream_running():
    """The serving path's collect returns while the forward's stream is still busy (it did not wait)."""
    dev = torch.device("cuda")
    st = rt.ProcessState(PluginSettings(enabled=True, selector=CONFIG)).stats
    logits = torch.randn(T, E, device=dev)
    r = select(logits, K, CONFIG)
    kw = {"logits": logits, "engine_ids": torch.topk(logits, K).indices, "chosen_ids": r.topk_ids,
          "active": r.active, "placement": Placement.contiguous(E, 4).to(dev)}
    st.record_call(1, **kw)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # keeps the stream busy for about a second
    st.record_call(1, **kw)
    assert not st.collect(wait=False)  # started, not arrived
    assert not torch.cuda.current_stream().query()  # the sleep still runs: nothing waited for it
    assert st.fold()[1]["calls"] == 2  # the explicit read waits, and is exact
