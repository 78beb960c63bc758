"""``xshare eval``: replay routing traces through the selection policies and compare them offline.

The options (argument groups below) become a replay plan in :mod:`xshare.commands._eval_plan`; the plan is replayed
by :mod:`xshare.eval.replay` (or, for ``--placement predictive``, :mod:`xshare.eval.replan`), and the rows of
metrics per setting are printed and written by :mod:`xshare.eval.report` (JSON, markdown) and
:mod:`xshare.eval.plots`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any

from xshare._io import help_epilog, usage_error
from xshare.commands._eval_plan import (
    DEFAULT_ALPHA,
    DEFAULT_BATCH,
    DEFAULT_GPUS,
    DEFAULT_REPLAN_EVERY,
    DEFAULT_REPLICA_SLOTS,
    DEFAULT_WARMUP,
    UsageError,
    build,
)

NAME = "eval"
HELP = "replay routing traces: what-if evaluation of policies, budgets, EP placements (EPLB) and a GPU cost model"


def _policy_knobs_text() -> str:
    """'topk: none; xshare: budget, warmup-k; ...' from each policy's declared knobs."""
    from xshare.selection.registry import all_policies

    return "; ".join(f"{p.name}: {', '.join(k.replace('_', '-') for k in p.knobs) or 'none'}" for p in all_policies())


def _knob_help(name: str) -> str:
    from xshare.selection.schema import SELECTOR

    return SELECTOR[name].help


def _input_arguments(g: argparse._ArgumentGroup) -> None:
    """Input: the traces, their layers and the batching seed."""
    g.add_argument("--trace", action="append", required=True, metavar="FILE",
                   help="routing trace .npz (repeatable: several files mix into heterogeneous batches)")
    g.add_argument("--layers", metavar="SPEC", help="trace layer indices to replay, e.g. 0,3,10-12 (default: all)")
    g.add_argument("--top-k", type=int, metavar="K", help="expected top-k; an error if a trace disagrees")
    g.add_argument("--seed", type=int, default=0, help="seed of the decode-like batches (default 0)")


def _sweep_arguments(g: argparse._ArgumentGroup) -> None:
    """Policies and sweep: the policies and the knob values they are run over."""
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


def _parallel_arguments(g: argparse._ArgumentGroup) -> None:
    """Expert parallelism: GPUs, the expert placement (EPLB, predictive re-plans)."""
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


def _cost_arguments(g: argparse._ArgumentGroup) -> None:
    """GPU cost model: the model shape and GPU preset of the roofline model."""
    g.add_argument("--model", default="auto", metavar="NAME",
                   help="model shape: auto (the preset matching the trace's experts and top-k), none, or one of "
                        "deepseek-v2-lite, deepseek-v3, qwen3-30b-a3b, gpt-oss-120b")
    g.add_argument("--gpu-type", choices=("h100", "h200"), default="h100", help="GPU preset (default h100)")
    g.add_argument("--hbm-efficiency", type=float, default=0.8, help="achieved / peak HBM bandwidth (default 0.8)")
    g.add_argument("--flops-efficiency", type=float, default=0.6, help="achieved / peak tensor FLOPS (default 0.6)")
    g.add_argument("--a2a-latency-us", type=float, default=10.0, help="fixed cost per all-to-all (default 10 us)")
    g.add_argument("--selector-us", type=float, default=10.0,
                   help="GPU time of a selection policy per MoE layer (default 10 us; topk: 0)")


def _output_arguments(g: argparse._ArgumentGroup) -> None:
    """Output: files, tables, comparisons, workers."""
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    help_epilog(p, (
        "Sweeps: --batch, --budget, --target-mass, --warmup-k and --gpu-cap are repeatable; every policy is run\n"
        f"over the knobs it reads ({_policy_knobs_text()}).\n"
        "Per-policy values: --policy 'oea:warmup_k=1,2,3'.\n\n"
        "Example (both ESFT traces mixed, B = 16):\n"
        "  xshare eval --trace ../shared/traces/esft_intent.npz --trace ../shared/traces/esft_summary.npz \\\n"
        "      --policy topk --policy xshare --policy xshare_ep --budget 32 --gpu-cap 4 --gpus 8 --json out.json\n"
        "See docs/eval.md."
    ))
    for title, add in (
        ("input", _input_arguments),
        ("policies and sweep", _sweep_arguments),
        ("expert parallelism", _parallel_arguments),
        ("GPU cost model", _cost_arguments),
        ("output", _output_arguments),
    ):
        add(p.add_argument_group(title))

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


def _replay(args: argparse.Namespace, built: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """Replay the plan (or every predictive placement variant): (one row of metrics per setting, wall seconds)."""
    from xshare.eval.replan import replay_variants, variant_rows
    from xshare.eval.replay import replay
    from xshare.eval.summary import summarise_all

    progress = False if args.no_progress else None
    schedule = built["schedule"]
    if schedule is None:
        result = replay(built["plan"], jobs=args.jobs, progress=progress)
        return summarise_all(result), result.wall_seconds
    replayed = replay_variants(schedule, jobs=args.jobs, progress=progress)
    return variant_rows(schedule, replayed), replayed[0][1].wall_seconds


def _print_inputs(args: argparse.Namespace, built: dict[str, Any]) -> None:
    """The traces, layers, batches and placement replayed."""
    plan = built["plan"]
    trace = plan.trace
    bat = ", ".join(f"B={b}: {bt.num_batches} batches ({bt.dropped_tokens} tokens left over)" if b is not None
                    else f"recorded: {bt.num_batches} batches" for b, bt in plan.batches.items())
    print(f"traces: {', '.join(trace.paths)} ({trace.model}; {trace.num_tokens} tokens, {trace.num_sequences} "
          f"sequences; E={trace.num_experts}, top-{trace.top_k})")
    print(f"layers: {len(plan.layers)} of {trace.num_layers}; {bat}; seed {args.seed}")
    pinfo = built["placement_info"]
    gpus = pinfo["num_gpus"]
    if built["schedule"] is None:
        print(f"placement: {pinfo['kind']}, {gpus} GPU{'' if gpus == 1 else 's'}, {pinfo['num_physical']} physical "
              "slots" + (f" ({pinfo['redundant']} redundant, EPLB {pinfo['mode']})" if pinfo["kind"] == "eplb" else ""))
    else:
        print(f"placements compared on {gpus} GPUs: {'; '.join(pinfo['variants'])}")


def _print_results(args: argparse.Namespace, built: dict[str, Any], rows: list[dict[str, Any]],
                   match: list[Any], proposed: dict[str, Any] | None, wall: float) -> None:
    """The results table, the placement and matched comparisons, the cost model's assumptions, the proposal."""
    from xshare.eval import report

    plan = built["plan"]
    print()
    print(report.text_table(rows))
    if built["schedule"] is not None:
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


def _markdown(built: dict[str, Any], rows: list[dict[str, Any]], match: list[Any]) -> str:
    """The --markdown text: the results table, the placement and matched comparisons, the cost model."""
    from xshare.eval import report

    plan = built["plan"]
    md = report.markdown_table(rows)
    if built["schedule"] is not None:
        md += "\n\n" + report.placement_markdown(rows)
    if match:
        md += "\n\n" + report.matched_markdown(match, rows)
    if plan.cost is not None:
        md += "\n\nCost model: " + "; ".join(plan.cost.assumptions()) + "\n"
    return md


def _write_outputs(args: argparse.Namespace, built: dict[str, Any], rows: list[dict[str, Any]],
                   match: list[Any], doc: dict[str, Any]) -> None:
    """--json, --markdown, --save-placement and --plot: everything is computed; each file appears whole or not at
    all."""
    from xshare.eval import report
    from xshare.eval.placements import placement_json

    plan = built["plan"]
    trace = plan.trace
    if args.json:
        report.write_atomic(args.json, report.to_json(doc))
        print(f"wrote {args.json}")
    if args.markdown:
        md = _markdown(built, rows, match)
        if args.markdown == "-":
            print()
            print(md)
        else:
            report.write_atomic(args.markdown, md + "\n")
            print(f"wrote {args.markdown}")
    if args.save_placement:
        report.write_atomic(args.save_placement, placement_json(built["phy2log"], args.gpus, trace.layer_names,
                                                                built["placement_info"]))
        print(f"wrote {args.save_placement}")
    if args.plot:
        title = f"{trace.model}, {len(plan.layers)} layers"
        names = _publish_plots(rows, args.plot, title)
        print(f"wrote {', '.join(os.path.join(args.plot, n) for n in names)}")


def run(args: argparse.Namespace) -> int:
    # the [eval] extra, before any work: xshare.cli names the extra to install when one of these is missing
    import numpy  # noqa: F401
    import tqdm  # noqa: F401

    if args.plot:
        import matplotlib  # noqa: F401
    from xshare.eval import report
    from xshare.eval.traces import TraceError

    try:
        built = build(args)
    except (UsageError, TraceError, ValueError) as err:
        return usage_error("xshare eval", err)
    for note in built["notes"]:
        print(f"note: {note}", file=sys.stderr)
    rows, wall = _replay(args, built)
    match = report.matched(rows, args.match_active) if args.match_active else []
    doc = report.document(_settings_doc(args, built, wall), rows, match)
    proposed = None
    if args.propose_layer_budgets is not None:
        proposed = report.propose_layer_budgets(rows, args.propose_layer_budgets)
        doc["proposed_layer_budgets"] = proposed
    _print_inputs(args, built)
    _print_results(args, built, rows, match, proposed, wall)
    _write_outputs(args, built, rows, match, doc)
    return 0
