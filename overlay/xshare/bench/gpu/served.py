"""Part 5: the plugin's whole per-call routing as SGLang calls it, captured in a CUDA graph.

SGLang's routing hook hands the plugin one ``_post_process_topk_ids`` call per MoE layer: the gate's
``topk_ids`` / ``topk_weights``, the router logits, the layer's ``TopKConfig``, the layer id and
``num_token_non_padded``; the plugin answers with :func:`xshare.sglang.layer.route`. SGLang cannot
be installed where this check runs, so the call is built here from the stand-ins of
:mod:`xshare.bench.gpu.standins` (``TopKConfig``, Llama-4's routing function, each family's gate as plain torch
ops: :func:`~xshare.bench.gpu.standins.vanilla_gate`). Whatever ``route`` does is measured as
it is: a call it leaves to SGLang (a fallback or a skip, read from the runtime's counters and its log)
makes the row say so, with ``correct`` false.

Per router family and batch size: the vanilla gate alone in a CUDA graph; ``route`` captured with the
runtime in the state the adapter sets under SGLang's graph capture (``ForwardState(capturing=True)``),
then replayed on new inputs written into the same buffers and checked against an eager ``route`` call
(``decide`` forced to its torch backend where that switch exists), also after settings changes (a
smaller budget, the selector off, on again: :func:`_follow_changes`); the same with the per-call metrics
window on (SGLang's ``--enable-metrics``). On the CPU (``--cpu``) a "replay" is a call in the capturing
state, times come from ``perf_counter``, and the selector's backend setting is 'triton' (interpreted):
what 'auto' picks for CUDA tensors, so that CI checks the path a GPU serves against the torch reference.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from xshare.bench.gpu.context import Context
from xshare.bench.gpu.reference import (
    caught_log,
    compare,
    reference_kind,
    routed_backend,
    served_backend,
    torch_backend,
)
from xshare.bench.gpu.standins import topk_config, vanilla_gate
from xshare.bench.gpu.timing import cuda_graph, time_call, time_replays

CHECKS = 2  # replays on new inputs checked against the eager reference, per measurement


# -- one served call ------------------------------------------------------------------------------
class ServedCall:
    """One MoE layer's routing-hook call with its own plugin runtime: persistent buffers of the hook's
    arguments (what a captured graph reads), refilled with a new batch by :meth:`fill`.

    Buffers: ``router_logits`` bf16 [B, E], ``topk_ids`` int32 [B, width], ``topk_weights`` float32
    [B, width] (width = routed top-k + shared slots, written by :func:`vanilla_gate`) and
    ``num_token_non_padded`` int32 [1] (SGLang's graph buffer: rows at and past it are padding).
    """

    def __init__(self, ctx: Context, family: dict[str, Any], *, batch: int, policy: str, budget: int,
                 sim_gpus: int | None = None, observe: bool = False, seed: int = 0) -> None:
        from xshare.selection import SelectorConfig
        from xshare.sglang.settings import PluginSettings
        from xshare.sglang.state import ProcessState

        self.ctx, self.family, self.batch = ctx, family, batch
        e, k = family["experts"], family["top_k"]
        self.cfg = topk_config(family, ctx.device, seed)
        backend = served_backend(ctx)
        selector = SelectorConfig(policy=policy, budget=budget, warmup_k=1,
                                  **({"backend": backend} if backend is not None else {}))
        # cpu_kernel off: the C fast path would route only the eager CPU reference, not the captured call
        self.runtime = ProcessState(PluginSettings(enabled=True, selector=selector, sim_gpus=sim_gpus,
                                                   cpu_kernel=False))
        self.runtime.observe = observe  # what enable_observability sets (the exporter is not needed to route)
        self.sigma = _sigma(e, k)
        self.seed = seed
        self.draws = 0
        dev = ctx.device
        self.router_logits = torch.zeros(batch, e, dtype=torch.bfloat16, device=dev)
        self.topk_ids = torch.zeros(batch, self.cfg.top_k, dtype=torch.int32, device=dev)
        self.topk_weights = torch.zeros(batch, self.cfg.top_k, dtype=torch.float32, device=dev)
        self.num_token_non_padded = torch.full((1,), batch, dtype=torch.int32, device=dev)
        self.fill(batch)

    def fill(self, num_tokens: int) -> None:
        """A new batch in place: logits with the traces' statistics (:mod:`xshare.bench._routing`), the
        vanilla gate's ids and weights, ``num_tokens`` real rows."""
        from xshare.bench._routing import synthetic_logits

        self.draws += 1
        logits = synthetic_logits(1, self.batch, self.family["experts"], sigma=self.sigma,
                                  seed=self.seed * 7919 + self.batch * 131 + self.draws, dtype=torch.bfloat16,
                                  device=self.ctx.device)[0]
        self.router_logits.copy_(logits)
        ids, weights = vanilla_gate(self.cfg, self.router_logits)
        self.topk_ids.copy_(ids)
        self.topk_weights.copy_(weights)
        self.num_token_non_padded.fill_(num_tokens)

    def gate(self) -> tuple[Tensor, Tensor]:
        return vanilla_gate(self.cfg, self.router_logits)

    def args(self) -> dict[str, Any]:
        """The hook's bound arguments, by SGLang's parameter names."""
        return {"topk_ids": self.topk_ids, "topk_weights": self.topk_weights, "topk_config": self.cfg,
                "router_logits": self.router_logits, "layer_id": 0, "num_token_non_padded": self.num_token_non_padded,
                "expert_location_dispatch_info": None, "padded_rows_masked": False}

    def call(self) -> dict[str, Any] | None:
        """One ``route`` call in the runtime's current forward state."""
        from xshare.sglang.layer import route

        return route(self.runtime, self.args(), self.cfg)

    def reference(self) -> dict[str, Any] | None:
        """The same call eagerly, outside capture (a decode forward), ``decide`` on its torch backend
        where it has that switch."""
        from xshare.sglang.state import ForwardState

        self.runtime.push(ForwardState(mode="decode"))
        try:
            with torch_backend():
                return self.call()
        finally:
            self.runtime.pop()

    def counters(self) -> Counter[str]:
        """Calls the runtime left to SGLang, by reason: fallbacks (the selector raised) by exception
        type, skips as ``skip:reason``."""
        st = self.runtime.stats
        return Counter(dict(st.fallbacks)) + Counter({f"skip:{r}": n for r, n in st.skipped.items()})


@functools.cache
def _sigma(num_experts: int, top_k: int) -> float:
    """The traces' shared-preference scale for (E, top_k) (deterministic, seconds to fit: fitted once)."""
    from xshare.bench._routing import fit_sigma

    return fit_sigma(num_experts, top_k)


def _settle() -> None:
    """Wait for the device after a failed capture; an error it raises again belongs to the row already failed."""
    with contextlib.suppress(Exception):  # the capture's own error is the one the row reports
        torch.cuda.synchronize()


def _record(ctx: Context, sc: ServedCall) -> tuple[Callable[[], None] | None, Callable[[], Any], str, str | None]:
    """(replay, the answer its replays write, mode, capture error): ``ctx.inner`` calls captured in one
    CUDA graph; on the CPU a replay is a call (its answer kept)."""
    if ctx.device.type == "cuda":
        try:
            graph, out = cuda_graph(sc.call, ctx.inner)
        except Exception as exc:  # noqa: BLE001 - a capture that fails is the row's result
            _settle()
            return None, lambda: None, "capture failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return graph.replay, lambda: out, "cuda-graph", None
    box = [sc.call()]

    def replay() -> None:
        box[0] = sc.call()

    return replay, lambda: box[0], "cpu-call", None


def _changed_rows(sc: ServedCall, answer: dict[str, Any] | None) -> int | None:
    """Rows of the current batch whose routed experts the answer changed from the gate's (None: no answer)."""
    if answer is None:
        return None
    k = sc.family["top_k"]
    new = torch.sort(answer["topk_ids"][:, :k].long(), 1).values
    old = torch.sort(sc.topk_ids[:, :k].long(), 1).values
    return int((new != old).any(1).sum())


def _eager_us(ctx: Context, sc: ServedCall) -> float:
    """µs per eager call (wall clock, synchronised): the median of 3 samples of 5 calls (CPU mode: one
    call, its time means nothing)."""
    calls, repeats = (1, 1) if ctx.cpu else (5, 3)
    samples = []
    for _ in range(repeats):
        ctx.sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            sc.call()
        ctx.sync()
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples) * 1e6


def _follow_changes(ctx: Context, sc: ServedCall, replay: Callable[[], None], output: Callable[[], Any]) -> list[str]:
    """The captured graph after settings changes, as the admin endpoint makes them (the settings swapped,
    the knobs written at the next forward boundary): a smaller budget, the selector off, on again. Each
    replay on a new batch must equal an eager call in the new state (off: SGLang's own routing). The
    first settings are restored after."""
    import dataclasses

    runtime = sc.runtime
    start = runtime.settings
    smaller = max(sc.family["top_k"], _budget(sc.family) // 2)
    changes = [("budget", dataclasses.replace(start, selector=start.selector.replace(budget=smaller))),
               ("disable", dataclasses.replace(start, enabled=False)),
               ("enable", start)]
    diffs: list[str] = []
    try:
        for name, settings in changes:
            runtime.update_settings(settings)
            runtime.sync_knobs()  # what the forward hook does before the next forward, replays included
            sc.fill(sc.batch)
            replay()
            ctx.sync()
            if settings.enabled:
                diffs += [f"after {name}: {d}" for d in compare(output(), sc.reference())]
            else:
                own = {"topk_ids": sc.topk_ids, "topk_weights": sc.topk_weights}
                diffs += [f"after {name}: {d}" for d in compare(output(), own)]
    finally:
        runtime.update_settings(start)
        runtime.sync_knobs()
    return diffs


def measure(ctx: Context, sc: ServedCall) -> dict[str, Any]:
    """Capture ``sc``'s call in the capturing state, check replays on new inputs against the eager
    reference, time the replays: ``served_us`` (None when the captured calls left the routing to SGLang:
    the graph then holds no routing to time), ``mode``, ``correct``, ``fallback`` (calls left to SGLang
    while capturing, by reason), ``capture_error``, ``diffs``, ``log``, ``backend``, ``eager_us``,
    ``changed_rows`` (of the last checked batch)."""
    from xshare.sglang.state import ForwardState

    res: dict[str, Any] = {"served_us": None, "eager_us": None, "mode": None, "correct": False, "fallback": {},
                           "capture_error": None, "diffs": [], "log": [], "backend": None, "calls": 0,
                           "changed_rows": None}
    with caught_log() as log:
        sc.runtime.push(ForwardState(mode="decode", capturing=True))
        try:
            res["backend"] = routed_backend(sc.call)
            before = sc.counters()
            replay, output, res["mode"], res["capture_error"] = _record(ctx, sc)
            res["fallback"] = dict(sc.counters() - before)
            diffs = [] if replay is not None else [f"capture failed: {res['capture_error']}"]
            for i in range(CHECKS if replay is not None else 0):
                sc.fill(sc.batch - i % 2 if sc.batch > 1 else 1)  # the second check has one padded row
                replay()
                ctx.sync()
                diffs += [f"check {i + 1}: {d}" for d in compare(output(), sc.reference())]
            if replay is not None:
                diffs += _follow_changes(ctx, sc, replay, output)
            res["diffs"] = diffs[:8]
            res["changed_rows"] = _changed_rows(sc, output())
            res["correct"] = not diffs and not res["fallback"]
            res["eager_us"] = _eager_us(ctx, sc)
            if replay is not None and output() is not None and not res["fallback"]:  # else it times no routing
                if ctx.device.type == "cuda":  # ~10x the selector's time per call: fewer replays
                    t = time_replays(ctx, replay, ctx.inner, replays=max(1, ctx.replays // 5))
                    res["served_us"], res["calls"] = t["seconds"] * 1e6, t["calls"]
                else:  # one replay (interpreted kernels are slow; CPU times mean nothing)
                    t0 = time.perf_counter()
                    replay()
                    res["served_us"], res["calls"] = (time.perf_counter() - t0) * 1e6, 1
        finally:
            sc.runtime.pop()
    res["log"] = list(dict.fromkeys(log))[:3]
    return res


def served_for_shape(ctx: Context, shape: dict[str, Any], batch: int) -> dict[str, Any]:
    """Part 4's served path: the routing hook of ``shape``'s router family at its E, top-k, policy and
    budget (its EP size as the placement's GPUs), measured as in part 5 (metrics off)."""
    family = dict(ctx.served_families[shape["family"]], experts=shape["experts"], top_k=shape["top_k"])
    return measure_safely(ctx, lambda: ServedCall(ctx, family, batch=batch, policy=shape["policy"],
                                                  budget=shape["budget"], seed=ctx.args.seed,
                                                  sim_gpus=shape["ep"] if shape["ep"] > 1 else None))


def measure_safely(ctx: Context, build: Callable[[], ServedCall]) -> dict[str, Any]:
    """:func:`measure` of the call ``build`` makes; a measurement that raises is a row that says so
    (``mode`` 'error', not correct), so the rows so far and the next ones are kept."""
    try:
        return measure(ctx, build())
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return _failed(exc)


def _failed(exc: Exception) -> dict[str, Any]:
    if torch.cuda.is_available():
        _settle()
    return {"served_us": None, "eager_us": None, "mode": "error", "correct": False, "fallback": {},
            "capture_error": None, "diffs": [f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300]],
            "log": [], "backend": None, "calls": 0, "changed_rows": None}


def _budget(family: dict[str, Any]) -> int:
    return max(family["top_k"], family["experts"] // 4)


def warm_call(ctx: Context, family: dict[str, Any], batch: int, policy: str = "xshare",
              budget: int | None = None, sim_gpus: int | None = None) -> None:
    """One eager call in the capturing state (compiles whatever kernels the served path launches)."""
    from xshare.sglang.state import ForwardState

    sc = ServedCall(ctx, family, batch=batch, policy=policy, budget=budget or _budget(family), sim_gpus=sim_gpus)
    sc.runtime.push(ForwardState(mode="decode", capturing=True))
    try:
        with caught_log():
            sc.call()
    finally:
        sc.runtime.pop()


# Policies without a fused kernel keep the torch reference (capture safe): their cost per call is
# reported on the first family at the middle batch size.
TORCH_POLICIES = ("lynx", "des_vote", "oea")


def _jobs(ctx: Context) -> list[tuple[str, dict[str, Any], int, str]]:
    jobs = [(name, fam, b, "xshare") for name, fam in ctx.served_families.items() for b in ctx.served_batch]
    if ctx.served_families:
        name, fam = next(iter(ctx.served_families.items()))
        b = sorted(ctx.served_batch)[len(ctx.served_batch) // 2]
        jobs += [(name, fam, b, policy) for policy in TORCH_POLICIES]
    return jobs


def part_served_path(ctx: Context) -> dict[str, Any]:
    rows, skipped, ok = [], 0, True
    for name, family, b, policy in _jobs(ctx):
        e, k = family["experts"], family["top_k"]
        if ctx.past("served_path"):
            skipped += 1
            continue
        budget = _budget(family)
        vanilla_us, vanilla_mode = None, None
        try:  # a row that raises says so; the rows so far and the next ones are kept
            sc = ServedCall(ctx, family, batch=b, policy=policy, budget=budget, seed=ctx.args.seed)
            vanilla = time_call(ctx, sc.gate)
            vanilla_us, vanilla_mode = vanilla["seconds"] * 1e6, vanilla["mode"]
            served = measure(ctx, sc)
            del sc
        except Exception as exc:  # noqa: BLE001 - the row reports what raised; the other rows still run
            served = _failed(exc)
        row: dict[str, Any] = {
            "family": name, "batch": b, "experts": e, "top_k": k, "width": k + int(family.get("shared", 0)),
            "router": family["note"], "policy": policy, "budget": budget, "vanilla_us": vanilla_us,
            "vanilla_mode": vanilla_mode, **served,
            "served_over_vanilla": (served["served_us"] / vanilla_us
                                    if served["served_us"] is not None and vanilla_us else None)}
        if ctx.past("served_path"):
            row["metrics"] = None
            skipped += 1
        else:
            metrics = measure_safely(ctx, lambda family=family, b=b, budget=budget, policy=policy: ServedCall(
                ctx, family, batch=b, policy=policy, budget=budget, observe=True, seed=ctx.args.seed))
            row["metrics"] = {key: metrics[key] for key in ("served_us", "mode", "correct", "fallback",
                                                            "capture_error", "diffs", "log")}
            ok &= metrics["correct"]
        ok &= served["correct"]
        rows.append(row)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"status": ("ok" if not skipped else "incomplete") if ok else "fail", "rows": rows, "skipped": skipped,
            "reference": reference_kind(),
            "policy": f"xshare, budget max(k, E/4), warm-up 1; {', '.join(TORCH_POLICIES)} on the first family",
            "backend_setting": served_backend(ctx) or "the default",
            "inputs": ("stand-in TopKConfig per family; bf16 router logits with the traces' statistics; the vanilla "
                       "gate's ids and weights; num_token_non_padded int32 [1] on the device"),
            "timing": ((f"CUDA events over CUDA-graph replays of {ctx.inner} calls" if not ctx.cpu
                        else "perf_counter of one call in the capturing state (CPU mode)")
                       + f"; {CHECKS} replays on new inputs checked against the reference")}
