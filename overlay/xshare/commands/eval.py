"""``xshare eval``: replay routing traces through the selection policies and compare them offline."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any

NAME = "eval"
HELP = "replay routing traces: what-if evaluation of policies, budgets, EP placements (EPLB) and a GPU cost model"

DEFAULT_BATCH = 16
DEFAULT_WARMUP = 1
DEFAULT_GPUS = 8
DEFAULT_REPLICA_SLOTS = 1
DEFAULT_REPLAN_EVERY = 16
DEFAULT_ALPHA = 0.2  # xshare.eval.predict.DEFAULT_ALPHA (checked by the tests; no numpy import for --help)


def _policy_knobs_text() -> str:
    """'topk: none; xshare: budget, warmup-k; ...' from each policy's declared knobs."""
    from xshare.selection.registry import all_policies

    return "; ".join(f"{p.name}: {', '.join(k.replace('_', '-') for k in p.knobs) or 'none'}" for p in all_policies())


def _knob_help(name: str) -> str:
    from xshare.selection.schema import SELECTOR

    return SELECTOR[name].help


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "Sweeps: --batch, --budget, --target-mass, --warmup-k and --gpu-cap are repeatable; every policy is run\n"
        f"over the knobs it reads ({_policy_knobs_text()}).\n"
        "Per-policy values: --policy 'oea:warmup_k=1,2,3'.\n\n"
        "Example (both ESFT traces mixed, B = 16):\n"
        "  xshare eval --trace ../shared/traces/esft_intent.npz --trace ../shared/traces/esft_summary.npz \\\n"
        "      --policy topk --policy xshare --policy xshare_ep --budget 32 --gpu-cap 4 --gpus 8 --json out.json\n"
        "See docs/eval.md."
    )
    g = p.add_argument_group("input")
    g.add_argument("--trace", action="append", required=True, metavar="FILE",
                   help="routing trace .npz (repeatable: several files mix into heterogeneous batches)")
    g.add_argument("--layers", metavar="SPEC", help="trace layer indices to replay, e.g. 0,3,10-12 (default: all)")
    g.add_argument("--top-k", type=int, metavar="K", help="expected top-k; an error if a trace disagrees")
    g.add_argument("--seed", type=int, default=0, help="seed of the decode-like batches (default 0)")

    g = p.add_argument_group("policies and sweep")
    g.add_argument("--policy", action="append", metavar="NAME[:knob=v,..]",
                   help="policy to evaluate (repeatable, or 'all'; default: all)")
    g.add_argument("--batch", action="append", type=int, metavar="B",
                   help=f"decode batch size: B tokens from B different sequences (repeatable; default "
                        f"{DEFAULT_BATCH}); not allowed with traces that record their batches (batch_ids)")
    g.add_argument("--budget", action="append", metavar="M",
                   help=f"{_knob_help('budget')}: an int <= E or a fraction in (0, 1], or one per trace layer "
                        f"(a JSON list, or {{\"default\": m, \"<layer index>\": m}}) (repeatable; default "
                        "none: a --target-mass is then uncapped)")
    g.add_argument("--target-mass", action="append", metavar="TAU",
                   help=f"{_knob_help('target_mass')}: a number in (0, 1] or none (repeatable; default none)")
    g.add_argument("--warmup-k", action="append", type=int, metavar="K0",
                   help=f"{_knob_help('warmup_k')} (repeatable; default {DEFAULT_WARMUP})")
    g.add_argument("--group-budget", metavar="MR", help=f"{_knob_help('group_budget')} (int or fraction)")

    g = p.add_argument_group("expert parallelism")
    g.add_argument("--gpus", type=int, default=DEFAULT_GPUS,
                   help=f"GPUs (EP size) of the placement (default {DEFAULT_GPUS})")
    g.add_argument("--gpu-cap", action="append", type=int, metavar="C",
                   help=f"{_knob_help('gpu_cap')} (repeatable)")
    g.add_argument("--placement", default="contiguous", metavar="none|contiguous|eplb|predictive|FILE",
                   help="expert placement: contiguous or none (e on GPU e // (E/G)), eplb (DeepSeek EPLB from "
                        "measured loads), predictive (compare none, EPLB's static plan and plans re-made every N "
                        "steps from a forecast of the load), or a JSON/.npy file with physical_to_logical_map "
                        "[L, P] or [P]")
    g.add_argument("--replica-slots", action="append", type=int, metavar="R",
                   help="spare expert slots per GPU (R x GPUs redundant experts) for eplb and predictive "
                        f"(repeatable with predictive; default {DEFAULT_REPLICA_SLOTS})")
    g.add_argument("--replan-every", action="append", type=int, metavar="N",
                   help=f"predictive: steps between re-plans (repeatable; default {DEFAULT_REPLAN_EVERY})")
    g.add_argument("--predictor", action="append", metavar="ewma|cross_layer|static",
                   help="predictive: forecast of the next steps' per-expert load (repeatable; default ewma)")
    g.add_argument("--planner", action="append", metavar="eplb|greedy",
                   help="predictive: EPLB on the forecast, or greedy spare slots beside a fixed contiguous home "
                        "(repeatable; default eplb)")
    g.add_argument("--ewma-alpha", type=float, metavar="A",
                   help=f"predictive: weight of the newest step in the EWMA forecasts (default {DEFAULT_ALPHA})")
    g.add_argument("--eplb-redundant", type=int, metavar="N", help="EPLB: redundant slots (default: one per GPU)")
    g.add_argument("--eplb-groups", type=int, default=1, metavar="N", help="EPLB: expert groups (model n_group; 1)")
    g.add_argument("--eplb-nodes", type=int, default=1, metavar="N", help="EPLB: nodes (default 1)")
    g.add_argument("--eplb-mode", choices=("auto", "hierarchical", "global"), default="auto",
                   help="EPLB: hierarchical iff groups %% nodes == 0 (auto), or forced")
    g.add_argument("--eplb-trace", action="append", metavar="FILE",
                   help="calibration trace(s) for EPLB loads (default: the replayed traces themselves)")
    g.add_argument("--save-placement", metavar="FILE", help="write the placement used (JSON, physical_to_logical_map)")

    g = p.add_argument_group("GPU cost model")
    g.add_argument("--model", default="auto", metavar="NAME",
                   help="model shape: auto (the preset matching the trace's experts and top-k), none, or one of "
                        "deepseek-v2-lite, deepseek-v3, qwen3-30b-a3b, gpt-oss-120b")
    g.add_argument("--gpu-type", choices=("h100", "h200"), default="h100", help="GPU preset (default h100)")
    g.add_argument("--hbm-efficiency", type=float, default=0.8, help="achieved / peak HBM bandwidth (default 0.8)")
    g.add_argument("--flops-efficiency", type=float, default=0.6, help="achieved / peak tensor FLOPS (default 0.6)")
    g.add_argument("--a2a-latency-us", type=float, default=10.0, help="fixed cost per all-to-all (default 10 us)")
    g.add_argument("--selector-us", type=float, default=10.0,
                   help="GPU time of a selection policy per MoE layer (default 10 us; topk: 0)")

    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="OUT", help="write the results as JSON")
    g.add_argument("--plot", metavar="DIR", help="write PNG figures into DIR")
    g.add_argument("--markdown", nargs="?", const="-", metavar="FILE",
                   help="markdown tables for docs (to FILE, or stdout without one)")
    g.add_argument("--match-active", action="append", type=float, metavar="N",
                   help="compare policies at N activated experts (interpolated on each policy's sweep; repeatable)")
    g.add_argument("--propose-layer-budgets", type=float, metavar="MASS",
                   help="from the budget sweep, per layer the smallest budget keeping MASS of the gate mass "
                        "there (printed; 'proposed_layer_budgets' in the JSON); evaluate it with --budget '[...]'")
    g.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def _build(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything and build the replay plan; raises UsageError/ValueError before any work."""
    from xshare.eval.batching import decode_batches, recorded_batches
    from xshare.eval.costmodel import GPUS, MODELS, CostModel, match_model
    from xshare.eval.placements import EPLBOptions, build_placements
    from xshare.eval.replay import Plan, Setting, knobs_of, make_settings
    from xshare.eval.traces import load_traces, parse_layers
    from xshare.selection.registry import check_per_layer
    from xshare.selection.types import ModelShape

    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--save-placement", args.save_placement)):
        _check_out_file(path, flag)
    _check_out_dir(args.plot, "--plot")
    if args.jobs < 1:
        raise UsageError("--jobs must be >= 1")
    if args.propose_layer_budgets is not None and not 0 < args.propose_layer_budgets <= 1:
        raise UsageError(f"--propose-layer-budgets {args.propose_layer_budgets}: must be in (0, 1]")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError("--top-k must be >= 1")

    trace = load_traces(args.trace, top_k=args.top_k)
    where = trace.paths[0] if len(trace.paths) == 1 else f"{trace.paths[0]} (and {len(trace.paths) - 1} more)"
    e, k = trace.num_experts, trace.top_k
    layers = parse_layers(args.layers, trace.num_layers)

    # batches
    batches: dict[int | None, Any] = {}
    if trace.batch_ids is not None:
        if args.batch:
            raise UsageError(f"--batch: {trace.paths[0]} records its batches (key 'batch_ids'); they are replayed "
                             "as recorded, drop --batch")
        batches[None] = recorded_batches(trace.batch_ids)
    else:
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

    # knobs
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
    axes = {"budget": budgets, "target_mass": masses, "warmup_k": warmups, "group_budget": group_budgets,
            "gpu_cap": caps}
    policies = _policies(args, e, where)
    for name, ov, _ in policies:
        for w in ov.get("warmup_k", []):
            if w < 0 or w > k:
                raise UsageError(f"--policy {name}: warmup_k {w} must be in [0, top_k = {k}]")
        for c in ov.get("gpu_cap", []):
            if c < 1:
                raise UsageError(f"--policy {name}: gpu_cap {c} must be >= 1")
    settings = make_settings([(n, ov) for n, ov, _ in policies], list(batches), axes)
    from_all = {n for n, _, a in policies if a} - {n for n, _, a in policies if not a}
    notes: list[str] = []
    valid: list[Setting] = []
    layer_shape = ModelShape(e, k, tuple(range(trace.num_layers)))  # per-layer values: one per trace layer
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

    # placement
    calibration = None
    if args.eplb_trace:
        if args.placement not in ("eplb", "predictive"):
            raise UsageError("--eplb-trace needs --placement eplb or predictive")
        calibration = load_traces(args.eplb_trace)
        for key, a, b in (("num_experts", calibration.num_experts, e), ("top_k", calibration.top_k, k)):
            if a != b:
                raise UsageError(f"{calibration.paths[0]}: key 'meta': {key} = {a} but the replayed trace has {b}")
        if calibration.num_layers != trace.num_layers:
            raise UsageError(f"{calibration.paths[0]}: key 'topk_ids': {calibration.num_layers} layers, "
                             f"the replayed trace has {trace.num_layers}")
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

    # cost model
    cost = None
    model_note = None
    if args.model != "none":
        key = match_model(e, k) if args.model == "auto" else args.model
        if args.model != "auto" and key not in MODELS:
            raise UsageError(f"--model {args.model}: unknown; presets: {', '.join(MODELS)}, auto, none")
        if key is None:
            model_note = f"no cost-model preset has {e} experts / top-{k}: cost model off (--model none)"
        else:
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
    plan = Plan(trace=trace, layers=layers, batches=batches, settings=valid, placements=placements, cost=cost,
                placement_kind=pinfo["kind"])
    schedule = None
    if predictive:
        if args.save_placement:
            raise UsageError("--save-placement: a predictive placement changes over time; save one with --placement "
                             "eplb")
        schedule = _schedule(args, plan, slots, calibration or trace, eplb)
        pinfo = {"kind": "predictive", "num_gpus": args.gpus, "variants": [v.label() for v in schedule.variants],
                 "forecasts_from": list((calibration or trace).paths), "ewma_alpha": schedule.alpha,
                 "expert_bytes": schedule.expert_bytes, "moe_layers": schedule.moe_layers,
                 "moved_bytes": "expert copies a re-plan loads onto a GPU x bytes of one expert (layer shape of "
                                "the cost-model preset), scaled from the replayed layers to the model's MoE layers"}
    return {"plan": plan, "placement_info": pinfo, "phy2log": phy2log, "notes": notes, "model_note": model_note,
            "knobs": {n: list(knobs_of(n)) for n, _, _ in policies}, "axes": axes, "schedule": schedule}


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


def _settings_doc(args: argparse.Namespace, built: dict[str, Any], wall: float) -> dict[str, Any]:
    import platform

    import torch

    from xshare import __version__

    plan = built["plan"]
    trace = plan.trace
    return {
        "options": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"},
        "traces": trace.describe(),
        "layers": plan.layers,
        "layer_names": [trace.layer_names[i] for i in plan.layers],
        "seed": args.seed,
        "batching": {
            ("recorded" if b is None else str(b)): {"mode": bt.mode, "batches": bt.num_batches,
                                                    "tokens_mean": float(bt.sizes.mean()),
                                                    "dropped_tokens": bt.dropped_tokens}
            for b, bt in plan.batches.items()
        },
        "unknown_experts": "outside a token's stored top-K: usable with gate probability 0 (counts 0 in mass kept)",
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "placement": built["placement_info"],
        "policy_knobs": built["knobs"],
        "sweep": dict(built["axes"]),
        "cost_model": None if plan.cost is None else plan.cost.describe(),
        "cost_model_note": built["model_note"],
        "notes": built["notes"],
        "selector_timing": f"CPU, torch {torch.__version__}, 1 thread, {platform.processor() or platform.machine()}, "
                           f"{args.jobs} job(s)",
        "xshare_version": __version__,
        "wall_seconds": wall,
    }


def _publish_plots(rows: list[dict[str, Any]], folder: str, title: str) -> list[str]:
    from xshare.eval.plots import write_plots

    parent = os.path.dirname(os.path.abspath(folder))
    tmp = tempfile.mkdtemp(prefix=".xshare-plots-", dir=parent)
    try:
        names = write_plots(rows, tmp, title)
        os.makedirs(folder, exist_ok=True)
        for n in names:
            os.replace(os.path.join(tmp, n), os.path.join(folder, n))
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    # the [eval] extra, before any work: xshare.cli names the extra to install when one of these is missing
    import numpy  # noqa: F401
    import tqdm  # noqa: F401

    if args.plot:
        import matplotlib  # noqa: F401
    from xshare.eval import report
    from xshare.eval.placements import placement_json
    from xshare.eval.replan import replay_variants, variant_rows
    from xshare.eval.replay import replay, summarise_all
    from xshare.eval.traces import TraceError

    try:
        built = _build(args)
    except (UsageError, TraceError, ValueError) as err:
        print(f"xshare eval: error: {err}", file=sys.stderr)
        return 2
    plan = built["plan"]
    for note in built["notes"]:
        print(f"note: {note}", file=sys.stderr)
    progress = False if args.no_progress else None
    schedule = built["schedule"]
    if schedule is None:
        result = replay(plan, jobs=args.jobs, progress=progress)
        rows = summarise_all(result)
        wall = result.wall_seconds
    else:
        replayed = replay_variants(schedule, jobs=args.jobs, progress=progress)
        rows = variant_rows(schedule, replayed)
        wall = replayed[0][1].wall_seconds
    match = report.matched(rows, args.match_active) if args.match_active else []
    doc = report.document(_settings_doc(args, built, wall), rows, match)
    proposed = None
    if args.propose_layer_budgets is not None:
        proposed = report.propose_layer_budgets(rows, args.propose_layer_budgets)
        doc["proposed_layer_budgets"] = proposed

    trace = plan.trace
    bat = ", ".join(f"B={b}: {bt.num_batches} batches ({bt.dropped_tokens} tokens left over)" if b is not None
                    else f"recorded: {bt.num_batches} batches" for b, bt in plan.batches.items())
    print(f"traces: {', '.join(trace.paths)} ({trace.model}; {trace.num_tokens} tokens, {trace.num_sequences} "
          f"sequences; E={trace.num_experts}, top-{trace.top_k})")
    print(f"layers: {len(plan.layers)} of {trace.num_layers}; {bat}; seed {args.seed}")
    pinfo = built["placement_info"]
    gpus = pinfo["num_gpus"]
    if schedule is None:
        print(f"placement: {pinfo['kind']}, {gpus} GPU{'' if gpus == 1 else 's'}, {pinfo['num_physical']} physical "
              "slots" + (f" ({pinfo['redundant']} redundant, EPLB {pinfo['mode']})" if pinfo["kind"] == "eplb" else ""))
    else:
        print(f"placements compared on {gpus} GPUs: {'; '.join(pinfo['variants'])}")
    print()
    print(report.text_table(rows))
    if schedule is not None:
        print()
        print(report.placement_markdown(rows))
    if match:
        print()
        print(report.matched_markdown(match, rows))
    print()
    if plan.cost is not None:
        print("cost model (MoE ms/step, OTPS ratio) assumptions:")
        for line in plan.cost.assumptions():
            print(f"  - {line}")
    elif built["model_note"]:
        print(f"cost model: {built['model_note']}")
    if args.propose_layer_budgets is not None:
        if proposed is None:
            print("per-layer budgets: no xshare budget sweep to propose them from")
        else:
            print(f"per-layer budgets keeping {args.propose_layer_budgets:g} of the mass on every layer: "
                  f"{json.dumps(proposed['budgets'])} (total {proposed['total']}, mean {proposed['mean']:.2f} "
                  f"per layer; from the budgets {proposed['swept_budgets']})")
    print(f"replay: {wall:.1f} s")

    # outputs: everything computed; each file appears whole or not at all
    if args.json:
        report.write_atomic(args.json, report.to_json(doc))
        print(f"wrote {args.json}")
    if args.markdown:
        md = report.markdown_table(rows)
        if schedule is not None:
            md += "\n\n" + report.placement_markdown(rows)
        if match:
            md += "\n\n" + report.matched_markdown(match, rows)
        if plan.cost is not None:
            md += "\n\nCost model: " + "; ".join(plan.cost.assumptions()) + "\n"
        if args.markdown == "-":
            print()
            print(md)
        else:
            report.write_atomic(args.markdown, md + "\n")
            print(f"wrote {args.markdown}")
    if args.save_placement:
        report.write_atomic(args.save_placement, placement_json(built["phy2log"], args.gpus, trace.layer_names, pinfo))
        print(f"wrote {args.save_placement}")
    if args.plot:
        title = f"{trace.model}, {len(plan.layers)} layers"
        names = _publish_plots(rows, args.plot, title)
        print(f"wrote {', '.join(os.path.join(args.plot, n) for n in names)}")
    return 0
