"""The validated replay plan of ``xshare eval``: the parsed options in, a :class:`xshare.eval.replay.Plan` out.

Reads the traces (:mod:`xshare.eval.traces`), makes the batches (:mod:`xshare.eval.batching`), the policy settings
of the sweep (:mod:`xshare.eval.replay`), the expert placement (:mod:`xshare.eval.placements`), the GPU cost
model (:mod:`xshare.eval.costmodel`) and, for ``--placement predictive``, the schedule of placement variants
(:mod:`xshare.eval.replan`). Every check runs before any work: bad input raises :class:`UsageError` naming the
option. Heavy imports stay inside the functions so that ``xshare eval --help`` needs neither numpy nor torch.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

DEFAULT_BATCH = 16
DEFAULT_WARMUP = 1
DEFAULT_GPUS = 8
DEFAULT_REPLICA_SLOTS = 1
DEFAULT_REPLAN_EVERY = 16
DEFAULT_ALPHA = 0.2  # xshare.eval.predict.DEFAULT_ALPHA (checked by the tests; no numpy import for --help)


class UsageError(ValueError):
    pass


def _parse_count(text: str, flag: str, num_experts: int, where: str) -> int | float | str | None:
    """A count; for --budget also one per trace layer (JSON list or map, kept as its canonical JSON text);
    'none' = not given (the setting's default)."""
    from xshare.selection.config import parse_count
    from xshare.selection.schema import SELECTOR

    if text.strip().lower() == "none":
        return None
    if flag.endswith("budget") and not flag.endswith("group-budget") and text.strip()[:1] in ("[", "{"):
        try:
            value = SELECTOR["budget"].parse(text)
        except ValueError as exc:
            raise UsageError(f"{flag} {text}: {exc}") from None
        values = value if isinstance(value, list) else list(value.values())
        for v in values:
            if isinstance(v, int) and v > num_experts:
                raise UsageError(f"{flag} {text}: {v} exceeds the number of experts E = {num_experts} of {where}")
        return json.dumps(value, separators=(",", ":"))
    try:
        value = parse_count(text, flag)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if isinstance(value, int) and value > num_experts:
        raise UsageError(f"{flag} {value} exceeds the number of experts E = {num_experts} of {where}")
    return value


def _parse_mass(text: str, flag: str) -> float | None:
    from xshare.selection.schema import SELECTOR

    try:
        return SELECTOR["target_mass"].parse(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _check_out_file(path: str | None, flag: str) -> None:
    if path is None or path == "-":
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: folder {parent} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder")


def _check_out_dir(path: str | None, flag: str) -> None:
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: folder {parent} does not exist")


def _policies(args: argparse.Namespace, num_experts: int, where: str) -> list[tuple[str, dict[str, list[Any]], bool]]:
    from xshare.eval.replay import parse_policy_spec
    from xshare.selection import available_policies

    known = available_policies()
    out: list[tuple[str, dict[str, list[Any]], bool]] = []
    for spec in args.policy or ["all"]:
        if spec.strip() == "all":
            out.extend((name, {}, True) for name in known)
            continue
        name, raw = parse_policy_spec(spec)
        if name not in known:
            raise UsageError(f"--policy {spec!r}: unknown policy {name!r}; available: {', '.join(known)}, all")
        overrides: dict[str, list[Any]] = {}
        for key, vals in raw.items():
            if key in ("budget", "group_budget"):
                overrides[key] = [_parse_count(v, f"--policy {name}:{key}", num_experts, where) for v in vals]
            elif key == "target_mass":
                overrides[key] = [_parse_mass(v, f"--policy {name}:{key}") for v in vals]
            else:
                try:
                    overrides[key] = [int(v) for v in vals]
                except ValueError:
                    raise UsageError(f"--policy {spec!r}: {key} needs ints") from None
        out.append((name, overrides, False))
    return out


def _check_options(args: argparse.Namespace) -> None:
    """The options that need no trace: output paths, --jobs, --propose-layer-budgets, --top-k."""
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--save-placement", args.save_placement)):
        _check_out_file(path, flag)
    _check_out_dir(args.plot, "--plot")
    if args.jobs < 1:
        raise UsageError("--jobs must be >= 1")
    if args.propose_layer_budgets is not None and not 0 < args.propose_layer_budgets <= 1:
        raise UsageError(f"--propose-layer-budgets {args.propose_layer_budgets}: must be in (0, 1]")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError("--top-k must be >= 1")


def _batches(args: argparse.Namespace, trace: Any, where: str) -> dict[int | None, Any]:
    """Batch size -> the batches to replay: decode-like ones per --batch, or the recorded ones (key None)."""
    from xshare.eval.batching import decode_batches, recorded_batches

    batches: dict[int | None, Any] = {}
    if trace.batch_ids is not None:
        if args.batch:
            raise UsageError(f"--batch: {trace.paths[0]} records its batches (key 'batch_ids'); they are replayed "
                             "as recorded, drop --batch")
        batches[None] = recorded_batches(trace.batch_ids)
        return batches
    for b in args.batch or [DEFAULT_BATCH]:
        if b < 1:
            raise UsageError(f"--batch must be >= 1, got {b}")
        try:
            bt = decode_batches(trace.seq_ids, trace.positions, b, args.seed)
        except ValueError as err:
            raise UsageError(f"{err} ({where})") from None
        if bt.num_batches == 0:
            raise UsageError(f"--batch {b}: no full batch can be built from {where}")
        batches[b] = bt
    return batches


def _sweep_axes(args: argparse.Namespace, e: int, k: int, where: str) -> dict[str, list[Any]]:
    """The swept knob values: knob -> values (an empty list: the knob's default)."""
    # no --budget: the config's default (half of E, or E with a mass target: uncapped)
    budgets = [_parse_count(b, "--budget", e, where) for b in (args.budget or [])]
    warmups = args.warmup_k or [DEFAULT_WARMUP]
    for w in warmups:
        if w < 0 or w > k:
            raise UsageError(f"--warmup-k {w}: must be in [0, top_k = {k}] of {where}")
    caps = args.gpu_cap or []
    for c in caps:
        if c < 1:
            raise UsageError(f"--gpu-cap {c}: must be >= 1")
    group_budgets = [] if args.group_budget is None else [_parse_count(args.group_budget, "--group-budget", e, where)]
    masses = [_parse_mass(t, "--target-mass") for t in (args.target_mass or [])]
    return {"budget": budgets, "target_mass": masses, "warmup_k": warmups, "group_budget": group_budgets,
            "gpu_cap": caps}


def _check_overrides(policies: list[tuple[str, dict[str, list[Any]], bool]], k: int) -> None:
    """The per-policy warmup_k and gpu_cap values of --policy NAME:knob=v."""
    for name, ov, _ in policies:
        for w in ov.get("warmup_k", []):
            if w < 0 or w > k:
                raise UsageError(f"--policy {name}: warmup_k {w} must be in [0, top_k = {k}]")
        for c in ov.get("gpu_cap", []):
            if c < 1:
                raise UsageError(f"--policy {name}: gpu_cap {c} must be >= 1")


def _valid_settings(policies: list[tuple[str, dict[str, list[Any]], bool]], batches: dict[int | None, Any],
                    axes: dict[str, list[Any]], trace: Any, notes: list[str]) -> list[Any]:
    """Every policy setting of the sweep whose per-layer values fit the trace; those of an 'all' that do not fit
    are skipped with a line in ``notes``, any other is an error."""
    from xshare.eval.replay import make_settings
    from xshare.selection.registry import check_per_layer
    from xshare.selection.types import ModelShape

    settings = make_settings([(n, ov) for n, ov, _ in policies], list(batches), axes)
    from_all = {n for n, _, a in policies if a} - {n for n, _, a in policies if not a}
    valid = []
    layer_shape = ModelShape(trace.num_experts, trace.top_k, tuple(range(trace.num_layers)))  # one per trace layer
    for s in settings:
        try:
            check_per_layer(s.config(), layer_shape)
        except ValueError as err:
            if s.policy in from_all:  # 'all' expands to every policy: skip the ones a knob does not fit
                notes.append(f"skipped {s.label()}: {err}")
                continue
            raise UsageError(f"--policy {s.policy} ({s.label()}): {err}") from None
        valid.append(s)
    if not valid:
        raise UsageError("no valid policy setting to evaluate")
    return valid


def _calibration(args: argparse.Namespace, trace: Any) -> Any:
    """The --eplb-trace traces (None without), checked against the replayed trace's shape."""
    from xshare.eval.traces import load_traces

    if not args.eplb_trace:
        return None
    if args.placement not in ("eplb", "predictive"):
        raise UsageError("--eplb-trace needs --placement eplb or predictive")
    calibration = load_traces(args.eplb_trace)
    for key, a, b in (("num_experts", calibration.num_experts, trace.num_experts),
                      ("top_k", calibration.top_k, trace.top_k)):
        if a != b:
            raise UsageError(f"{calibration.paths[0]}: key 'meta': {key} = {a} but the replayed trace has {b}")
    if calibration.num_layers != trace.num_layers:
        raise UsageError(f"{calibration.paths[0]}: key 'topk_ids': {calibration.num_layers} layers, "
                         f"the replayed trace has {trace.num_layers}")
    return calibration


def _cost_model(args: argparse.Namespace, e: int, k: int, where: str) -> tuple[Any, str | None]:
    """(the GPU cost model or None, a note saying why it is off when --model auto finds no preset)."""
    from xshare.eval.costmodel import GPUS, MODELS, CostModel, match_model

    if args.model == "none":
        return None, None
    key = match_model(e, k) if args.model == "auto" else args.model
    if args.model != "auto" and key not in MODELS:
        raise UsageError(f"--model {args.model}: unknown; presets: {', '.join(MODELS)}, auto, none")
    if key is None:
        return None, f"no cost-model preset has {e} experts / top-{k}: cost model off (--model none)"
    m = MODELS[key]
    if (m.num_experts, m.top_k) != (e, k):
        raise UsageError(f"--model {key}: {m.num_experts} experts / top-{m.top_k}, but {where} has {e} / "
                         f"top-{k}; the cost model needs a trace of that model")
    try:
        cost = CostModel(GPUS[args.gpu_type], m, args.gpus, hbm_efficiency=args.hbm_efficiency,
                         flops_efficiency=args.flops_efficiency, a2a_latency_us=args.a2a_latency_us,
                         selector_us=args.selector_us)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return cost, None


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything and build the replay plan; raises UsageError/ValueError before any work.

    Returns ``plan`` (:class:`xshare.eval.replay.Plan`), ``placement_info``, ``phy2log`` (the placement to save,
    [L, P] or None), ``notes``, ``model_note``, ``knobs`` (policy -> knobs it reads), ``axes`` (the sweep) and
    ``schedule`` (the predictive placement variants, or None).
    """
    from xshare.eval.placements import EPLBOptions, build_placements
    from xshare.eval.replay import Plan, knobs_of
    from xshare.eval.traces import load_traces, parse_layers

    _check_options(args)
    trace = load_traces(args.trace, top_k=args.top_k)
    where = trace.paths[0] if len(trace.paths) == 1 else f"{trace.paths[0]} (and {len(trace.paths) - 1} more)"
    e, k = trace.num_experts, trace.top_k
    layers = parse_layers(args.layers, trace.num_layers)
    batches = _batches(args, trace, where)
    axes = _sweep_axes(args, e, k, where)
    policies = _policies(args, e, where)
    _check_overrides(policies, k)
    notes: list[str] = []
    valid = _valid_settings(policies, batches, axes, trace, notes)

    calibration = _calibration(args, trace)
    kind = "contiguous" if args.placement == "none" else args.placement
    predictive = kind == "predictive"
    slots = _replica_slots(args, kind)
    redundant = args.eplb_redundant if kind == "eplb" and args.replica_slots is None else (
        slots[0] * args.gpus if kind == "eplb" else None)
    eplb = EPLBOptions(redundant=redundant, groups=args.eplb_groups, nodes=args.eplb_nodes, mode=args.eplb_mode)
    placements, pinfo, phy2log = build_placements("contiguous" if predictive else kind, trace, layers, args.gpus,
                                                  eplb, calibration)
    if args.save_placement and phy2log is None:
        import numpy as np  # contiguous: write it out explicitly

        phy2log = np.broadcast_to(np.arange(e), (trace.num_layers, e)).copy()

    cost, model_note = _cost_model(args, e, k, where)
    plan = Plan(trace=trace, layers=layers, batches=batches, settings=valid, placements=placements, cost=cost,
                placement_kind=pinfo["kind"])
    schedule = None
    if predictive:
        if args.save_placement:
            raise UsageError("--save-placement: a predictive placement changes over time; save one with --placement "
                             "eplb")
        schedule = _schedule(args, plan, slots, calibration or trace, eplb)
        pinfo = _predictive_info(args, schedule, calibration or trace)
    return {"plan": plan, "placement_info": pinfo, "phy2log": phy2log, "notes": notes, "model_note": model_note,
            "knobs": {n: list(knobs_of(n)) for n, _, _ in policies}, "axes": axes, "schedule": schedule}


def _predictive_info(args: argparse.Namespace, schedule: Any, forecasts_from: Any) -> dict[str, Any]:
    """The placement description of --placement predictive (``placement`` in the JSON)."""
    return {"kind": "predictive", "num_gpus": args.gpus, "variants": [v.label() for v in schedule.variants],
            "forecasts_from": list(forecasts_from.paths), "ewma_alpha": schedule.alpha,
            "expert_bytes": schedule.expert_bytes, "moe_layers": schedule.moe_layers,
            "moved_bytes": "expert copies a re-plan loads onto a GPU x bytes of one expert (layer shape of "
                           "the cost-model preset), scaled from the replayed layers to the model's MoE layers"}


def _replica_slots(args: argparse.Namespace, kind: str) -> list[int]:
    """--replica-slots (and the predictive-only options) checked against --placement."""
    if kind != "predictive":
        for flag, value in (("--replan-every", args.replan_every), ("--predictor", args.predictor),
                            ("--planner", args.planner), ("--ewma-alpha", args.ewma_alpha)):
            if value is not None:
                raise UsageError(f"{flag} needs --placement predictive")
    if args.replica_slots is None:
        return [DEFAULT_REPLICA_SLOTS]
    if kind not in ("eplb", "predictive"):
        raise UsageError("--replica-slots needs --placement eplb or predictive")
    if kind == "eplb":
        if len(args.replica_slots) > 1:
            raise UsageError("--replica-slots: one value with --placement eplb (several with predictive)")
        if args.eplb_redundant is not None:
            raise UsageError("--replica-slots and --eplb-redundant both set the redundant experts: give one")
    for r in args.replica_slots:
        if r < 0:
            raise UsageError(f"--replica-slots {r}: must be >= 0")
    return list(dict.fromkeys(args.replica_slots))


def _schedule(args: argparse.Namespace, plan: Any, slots: list[int], calibration: Any, eplb: Any) -> Any:
    """The variants of --placement predictive: none, EPLB's static plan per R, each predictive combination."""
    from dataclasses import replace

    from xshare.eval.costmodel import MODELS, match_model
    from xshare.eval.placements import build_placements
    from xshare.eval.predict import PLANNERS, PREDICTORS
    from xshare.eval.replan import Variant, build_schedule

    predictors = list(dict.fromkeys(args.predictor or ["ewma"]))
    for p in predictors:
        if p not in PREDICTORS:
            raise UsageError(f"--predictor {p!r}: unknown; choose one of {', '.join(PREDICTORS)}")
    planners = list(dict.fromkeys(args.planner or ["eplb"]))
    for p in planners:
        if p not in PLANNERS:
            raise UsageError(f"--planner {p!r}: unknown; choose one of {', '.join(PLANNERS)}")
    every = list(dict.fromkeys(args.replan_every or [DEFAULT_REPLAN_EVERY]))
    for n in every:
        if n < 1:
            raise UsageError(f"--replan-every {n}: must be >= 1 (steps)")
    alpha = DEFAULT_ALPHA if args.ewma_alpha is None else args.ewma_alpha
    if not 0 < alpha <= 1:
        raise UsageError(f"--ewma-alpha {alpha}: must be in (0, 1]")
    trace = plan.trace
    if trace.num_experts % args.gpus:
        raise UsageError(f"--placement predictive: --gpus {args.gpus} does not divide the {trace.num_experts} experts")
    variants = [Variant("none")] + [Variant("eplb", r) for r in slots] + [
        Variant("predictive", r, p, n, planner) for r in slots for p in predictors for n in every
        for planner in planners]
    static = {r: build_placements("eplb", trace, plan.layers, args.gpus, replace(eplb, redundant=r * args.gpus),
                                  calibration)[2] for r in slots}
    key = match_model(trace.num_experts, trace.top_k) if args.model in ("auto", "none") else args.model
    shape = MODELS.get(key) if key else None
    expert_bytes = None if shape is None else shape.params_per_expert * shape.expert_bytes_per_param
    return build_schedule(plan, variants, static, calibration, alpha=alpha, expert_bytes=expert_bytes,
                          moe_layers=None if shape is None else shape.moe_layers,
                          link_bandwidth=None if plan.cost is None else plan.cost.link_bandwidth)
