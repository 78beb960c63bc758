"""``xshare bench serve``'s command line: arguments, their checks, and the run (server, sweep, report)."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from xshare._io import help_epilog, usage_error
from xshare.bench._common import write_json_atomic
from xshare.bench.serve.client import Client
from xshare.bench.serve.grid import (
    DEFAULT_BUDGETS,
    DEFAULT_OEA_K0,
    DEFAULT_POLICIES,
    Setting,
    build_settings,
    parse_budget,
    parse_target_mass,
)
from xshare.bench.serve.report import describe_model, plot, table
from xshare.bench.serve.server import add_threads_argument, resolve_model, start_server
from xshare.bench.serve.sweep import sweep
from xshare.selection.config import parse_count


def add_arguments(p: argparse.ArgumentParser) -> None:
    help_epilog(p, ("Example (the full sweep of docs/benchmark.md):\n"
                "  xshare bench serve --out results/serve\n"
                "  xshare bench serve --policy xshare --budget 0.5 --problems 32 --rounds 1 --out /tmp/quick\n"
                "See docs/benchmark.md."))
    p.add_argument("--out", required=True, metavar="DIR", help="directory for serve.json and the plots")
    p.add_argument("--model-dir", metavar="DIR", help="trained tiny model (default: the cache; built if missing)")
    p.add_argument("--url", metavar="URL",
                   help="use a running server (started with --enable-metrics and XSHARE_ADMIN_TOKEN) "
                        "instead of starting one")
    p.add_argument("--policy", action="append", metavar="NAME",
                   help=f"policy (repeatable; default {', '.join(DEFAULT_POLICIES)}); off and topk always run")
    p.add_argument("--budget", action="append", metavar="M",
                   help="budget of budgeted policies: int or fraction of E (repeatable; default 0.25, 0.5, 0.75)")
    p.add_argument("--target-mass", action="append", metavar="TAU",
                   help="target mass of the policies with one (xshare, xshare_ep), each at budget E (repeatable; "
                        "default none)")
    p.add_argument("--oea-k0", action="append", type=int, metavar="K0",
                   help="warm-up k0 of the policies swept over it (oea, des_seq; repeatable; default 1, 2)")
    p.add_argument("--warmup-k", type=int, default=1, help="warm-up k0 of the budgeted policies (default 1)")
    p.add_argument("--group-budget", metavar="M_R",
                   help="per-request budget of the per-request policies (xshare_spec): int or fraction of E "
                        "(default: the policy's, top_k)")
    p.add_argument("--anchor-k", metavar="K", action="append", type=_anchor,
                   help="the per-request policies' anchor_k (xshare_spec: what each request's first row keeps; "
                        "repeatable, one setting per value; 'none' = the default, top_k)")
    p.add_argument("--speculative-algorithm", metavar="NAME",
                   help="speculative decoding in the server (passed to SGLang; NGRAM runs on the CPU test bed): "
                        "every decode forward is then a verify forward, and per-request policies can run")
    p.add_argument("--speculative-num-draft-tokens", type=int, metavar="N",
                   help="draft tokens verified per request and forward (passed to SGLang; needs "
                        "--speculative-algorithm)")
    p.add_argument("--no-topk", action="store_true", help="leave out the topk setting")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--problems", type=int, default=80, help="held-out problems per setting and round (80)")
    p.add_argument("--seed", type=int, default=0, help="held-out sample seed (default 0)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all settings, interleaved (default 2)")
    p.add_argument("--sim-gpus", type=int, default=4, help="simulated EP size for peak GPU load (default 4)")
    p.add_argument("--dtype", default="float32", help="server --dtype (default float32)")
    add_threads_argument(p)
    p.add_argument("--token", help="admin token for --url (default $XSHARE_ADMIN_TOKEN)")


def _anchor(text: str) -> int | None:
    """--anchor-k: an int >= 0, or 'none' (argparse names the flag on a ValueError)."""
    if text.strip().lower() == "none":
        return None
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _check(args: argparse.Namespace) -> tuple[list[Setting], list[Any]]:
    from xshare.models import tasks as T

    for name in ("clients", "problems", "rounds", "sim_gpus"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    budgets = [parse_budget(b) for b in (args.budget or [str(b) for b in DEFAULT_BUDGETS])]
    k0 = args.oea_k0 or list(DEFAULT_OEA_K0)
    if any(k < 1 for k in k0):
        raise ValueError(f"--oea-k0 must be >= 1, got {k0}")
    masses = [parse_target_mass(t) for t in (args.target_mass or [])]
    if args.speculative_num_draft_tokens is not None and args.speculative_algorithm is None:
        raise ValueError("--speculative-num-draft-tokens needs --speculative-algorithm")
    if args.speculative_num_draft_tokens is not None and args.speculative_num_draft_tokens < 1:
        raise ValueError(f"--speculative-num-draft-tokens must be >= 1, got {args.speculative_num_draft_tokens}")
    group_budget = None if args.group_budget is None else parse_count(args.group_budget, "--group-budget")
    settings = build_settings(args.policy or list(DEFAULT_POLICIES), budgets, k0, warmup_k=args.warmup_k,
                              include_topk=not args.no_topk, target_masses=masses,
                              speculative=args.speculative_algorithm is not None, group_budget=group_budget,
                              anchors=args.anchor_k or (None,))
    return settings, T.heldout(args.problems, seed=args.seed)


def speculative_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The server's speculative decoding options, as given."""
    out: tuple[str, ...] = ()
    if args.speculative_algorithm is not None:
        out += ("--speculative-algorithm", args.speculative_algorithm)
    if args.speculative_num_draft_tokens is not None:
        out += ("--speculative-num-draft-tokens", str(args.speculative_num_draft_tokens))
    return out


def run(args: argparse.Namespace) -> int:
    from xshare.models import tasks as T

    try:
        settings, problems = _check(args)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: exists and is not a directory")
    except ValueError as e:
        return usage_error("xshare bench serve", e)
    out.mkdir(parents=True, exist_ok=True)
    srv = None
    t_start = time.monotonic()
    load_before = os.getloadavg()
    try:
        if args.url:
            token = args.token or os.environ.get("XSHARE_ADMIN_TOKEN")
            client = Client(args.url, token)
            model_desc: dict[str, Any] = {"url": args.url}
        else:
            model = resolve_model(args.model_dir)
            token = secrets.token_hex(16)
            print(f"xshare bench serve: starting the server on {model} ...", flush=True)
            srv = start_server(model, token=token, sim_gpus=args.sim_gpus, log_path=out / "server.log",
                               dtype=args.dtype, threads=args.server_threads, sglang_args=speculative_args(args))
            print(f"  ready in {srv.startup_seconds:.0f} s ({srv.base_url})", flush=True)
            client = Client(srv.base_url, token)
            model_desc = describe_model(model)
        print(f"  {len(settings)} settings x {args.rounds} rounds x {len(problems)} problems, "
              f"{args.clients} clients", flush=True)
        res = sweep(client, settings, problems, clients=args.clients, rounds=args.rounds,
                    max_new_tokens=T.MAX_ANSWER_CHARS + 1, fresh_cache=args.speculative_algorithm is not None)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"xshare bench serve: error: {e}", file=sys.stderr)
        if srv is not None:
            print(srv.log_tail(3000), file=sys.stderr)
        return 1
    finally:
        leftovers = srv.stop() if srv is not None else []
    meta = {"clients": args.clients, "problems": len(problems), "seed": args.seed, "rounds": args.rounds,
            "max_new_tokens": T.MAX_ANSWER_CHARS + 1, "sim_gpus": args.sim_gpus, "dtype": args.dtype,
            "server_threads": args.server_threads, "speculative": speculative_args(args),
            "model": model_desc, "cpu_count": os.cpu_count(), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "seconds": round(time.monotonic() - t_start, 1),
            "server_startup_seconds": srv.startup_seconds if srv is not None else None,
            "leftover_processes": leftovers, "tasks": list(T.TASKS)}
    doc = {"meta": meta, "settings": [s.to_dict() for s in settings], "rows": res["rows"], "errors": res["errors"]}
    write_json_atomic(out / "serve.json", doc)
    plots = plot(res["rows"], out)
    print(table(res["rows"], T.TASKS))
    print(f"decode tok/s = {args.clients} x decode tokens / decode seconds per request (meta_info); x off = its ratio "
          f"to off; experts/layer from /metrics; peak GPU = max experts on one of {args.sim_gpus} simulated GPUs")
    print(f"wrote {out / 'serve.json'}, " + ", ".join(str(p) for p in plots))
    incomplete = [r["name"] for r in res["rows"] if r["requests"] != r["expected_requests"]]
    if res["errors"] or incomplete or leftovers:
        print(f"xshare bench serve: FAILED: {len(res['errors'])} request errors, incomplete settings {incomplete}, "
              f"leftover processes {leftovers}", file=sys.stderr)
        return 1
    return 0
