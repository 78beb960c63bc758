"""``xshare demo``: the selector in a real SGLang server, off then on, switched at runtime.

    xshare demo                      # the trained tiny model from the cache (built on first use)
    xshare demo --model-dir DIR --budget 0.5 --problems 32   # budget default: DEMO_BUDGET (0.25 of E)

Steps: build or load the trained tiny Qwen3-MoE (:func:`xshare.models.cache.ensure_model`);
start ONE SGLang server on the CPU with the plugin loaded, the selector off, the admin endpoint on
(a fresh random ``XSHARE_ADMIN_TOKEN``) and ``--enable-metrics``; send a batch of held-out problems
from ``--clients`` concurrent clients (greedy); turn the selector on at runtime (``PUT
/xshare/config``); send the same batch again; print a table (activated experts per layer, peak
experts on one of the simulated GPUs, tokens/s, exact match; off vs on) and the ``xshare:`` lines of
``/metrics``; stop the server and check that none of its processes is left. Exit code 0 only if
every request was answered and the server stopped cleanly.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from xshare._io import usage_error

NAME = "demo"
HELP = "start a real SGLang server with the plugin, send a batch with the selector off then on, print the figures"

# The demo's budget for the tiny model (32 experts, top-4, 16 clients): 0.25·E = 8 experts per layer, about
# what the vLLM port's own benchmark uses (24 of 128) and where the tiny model's decode speed-up shows
# (docs/benchmark.md). The plugin's default for serving stays 0.5·E (XSHARE_BUDGET): on DeepSeek-V2-Lite
# routing 0.25·E keeps 79 % of the gate mass, 0.5·E 97 % (docs/eval.md).
DEMO_BUDGET = 0.25

_METRIC_PREFIXES = ("xshare:enabled", "xshare:config_info", "xshare:budget", "xshare:warmup_k",
                    "xshare:active_experts_sum", "xshare:active_experts_count", "xshare:vanilla_active_experts_sum",
                    "xshare:peak_gpu_active_experts_sum", "xshare:peak_gpu_active_experts_count",
                    "xshare:vanilla_peak_gpu_active_experts_sum", "xshare:gpu_active_experts",
                    "xshare:mass_kept_sum", "xshare:selector_calls_total", "xshare:fallbacks_total",
                    "xshare:config_changes_total")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", metavar="DIR", help="trained tiny model (default: the cache; built if missing)")
    p.add_argument("--policy", default="xshare", help="policy switched on at runtime (default xshare)")
    p.add_argument("--budget", default=None,
                   help=f"its budget: int or fraction of E (default {DEMO_BUDGET}: the tiny model's budget, "
                        "docs/benchmark.md; the plugin's serving default is XSHARE_BUDGET's)")
    p.add_argument("--warmup-k", type=int, default=None, help="its warm-up k0 (default: the plugin's default)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--problems", type=int, default=160, help="held-out problems in the batch (default 160)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of off and on, interleaved (off, on, then on, off, ...), pooled (default 3)")
    p.add_argument("--seed", type=int, default=0, help="held-out sample seed (default 0)")
    p.add_argument("--sim-gpus", type=int, default=4, help="simulated EP size for the per-GPU figures (default 4)")
    p.add_argument("--dtype", default="float32", help="server --dtype (default float32)")
    from xshare.bench.serve.server import add_threads_argument

    add_threads_argument(p)
    p.add_argument("--log", metavar="FILE", help="keep the server log here (default: a temporary file, shown on error)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")


def _selector(args: argparse.Namespace) -> Any:
    from xshare.bench.serve.grid import Setting, parse_budget
    from xshare.sglang.settings import load_settings

    defaults = load_settings({}).selector  # the plugin's shipped defaults
    budget = parse_budget(args.budget) if args.budget is not None else DEMO_BUDGET
    warmup = args.warmup_k if args.warmup_k is not None else defaults.warmup_k
    from xshare.bench.serve.grid import supported
    from xshare.selection import get_policy

    # a policy the one-server demo can show: no request groups needed, no GPU placement needed
    allowed = [p for p in supported() if not get_policy(p).needs_placement]
    if args.policy not in allowed:
        raise ValueError(f"--policy must be one of {', '.join(allowed)}, got {args.policy!r}")
    return Setting(f"on ({args.policy}, budget {budget}, k0 {warmup})", True, args.policy, budget, warmup)


def _say(t0: float, text: str) -> None:
    """A progress line stamped with the seconds since the demo started."""
    print(f"[{time.monotonic() - t0:5.1f}s] {text}", flush=True)


def _check(args: argparse.Namespace) -> Any:
    """The 'on' setting of the options, and the counts checked; ValueError names the bad option."""
    on = _selector(args)
    for name in ("clients", "problems", "sim_gpus", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return on


def _measure(client: Any, args: argparse.Namespace, off: Any, on: Any, problems: list[Any], t0: float
             ) -> dict[str, Any]:
    """Warm up, then ``--rounds`` rounds of the batch off and on (interleaved); setting name -> the pooled batch
    (``batch``), the metric figures of its windows (``figures``) and its accuracy (``accuracy``)."""
    from xshare.bench.serve.metrics import merge_windows, settled_metrics
    from xshare.bench.serve.waves import BatchResult, run_waves
    from xshare.models import tasks as T

    prompts = [p.prompt for p in problems]
    max_new = T.MAX_ANSWER_CHARS + 1
    client.set_config(off)
    run_waves(client, [p.prompt for p in T.heldout(args.clients, seed=10_000)], args.clients, max_new)  # warm-up
    runs: dict[str, list[tuple[Any, dict, dict]]] = {off.name: [], on.name: []}
    for r in range(args.rounds):  # interleaved, so that drifts of a shared CPU hit both settings
        for setting in ((off, on) if r % 2 == 0 else (on, off)):
            reply = client.set_config(setting)
            if setting.enabled and r == 0:
                _say(t0, f"PUT /xshare/config -> v{reply['version']}: {reply['config']} (applied on "
                         f"{len(reply['ranks'])} rank(s) while serving)")
            before = settled_metrics(client)
            batch = run_waves(client, prompts, args.clients, max_new)
            runs[setting.name].append((batch, before, settled_metrics(client)))
            _say(t0, f"round {r + 1}/{args.rounds} {setting.name}: {batch.requests}/{len(prompts)} answered by "
                     f"{args.clients} concurrent clients in {batch.wall_seconds:.1f} s")
    results = {}
    for name, rs in runs.items():
        pooled = BatchResult.pool([b for b, _, _ in rs])
        results[name] = {"batch": pooled, "figures": merge_windows([(bf, af) for _, bf, af in rs]),
                         "accuracy": T.accuracy(problems * len(rs), pooled.texts)}
    return results


def _serve(args: argparse.Namespace, off: Any, on: Any, problems: list[Any], t0: float
           ) -> tuple[dict[str, Any] | None, str, list[int], int | None]:
    """Start the server, measure, stop it: (the results or None after an error, the /metrics text, the processes
    the stop left behind, the server's pid)."""
    import tempfile

    from xshare.bench.serve.client import Client
    from xshare.bench.serve.server import resolve_model, start_server

    tmp = tempfile.TemporaryDirectory(prefix="xshare-demo-")
    log_path = Path(args.log) if args.log else Path(tmp.name) / "server.log"
    srv = None
    results, metrics_text, leftovers, server_pid = None, "", [], None
    try:
        model = resolve_model(args.model_dir)
        _say(t0, f"model: {model}")
        token = secrets.token_hex(16)
        _say(t0, f"starting SGLang with the xshare plugin (selector off, admin endpoint, --enable-metrics, "
                 f"{args.sim_gpus} simulated GPUs) ...")
        srv = start_server(model, token=token, sim_gpus=args.sim_gpus, log_path=log_path, dtype=args.dtype,
                           threads=args.server_threads)
        client = Client(srv.base_url, token)
        _say(t0, f"server ready at {srv.base_url} ({srv.startup_seconds:.0f} s)")
        measured = _measure(client, args, off, on, problems, t0)
        metrics_text = client.metrics_text()
        results = measured
    except (RuntimeError, OSError, ValueError) as e:
        print(f"xshare demo: error: {e}", file=sys.stderr)
        if srv is not None or log_path.exists():
            print("server log (tail):\n" + (srv.log_tail(4000) if srv is not None else ""), file=sys.stderr)
    finally:
        if srv is not None:
            server_pid = srv.proc.pid if srv.proc is not None else None
            leftovers = srv.stop()
            _say(t0, f"server stopped ({'cleanly' if not leftovers else f'left processes {leftovers}, killed'})")
        tmp.cleanup()
    return results, metrics_text, leftovers, server_pid


def _rows(args: argparse.Namespace, results: dict[str, Any], off: Any, on: Any) -> list[dict[str, Any]]:
    """One row per setting (off, on): requests, activated experts per layer, peak GPU, tokens/s, accuracy."""
    r_off, r_on = results[off.name], results[on.name]
    van = r_on["figures"]["vanilla_per_layer"]
    rows = []
    for name, r, layers, peak in (
            ("off", r_off, van, r_on["figures"]["vanilla_peak_gpu_experts"]),
            (on.name, r_on, r_on["figures"]["activated_per_layer"], r_on["figures"]["peak_gpu_experts"])):
        b = r["batch"]
        tps = b.completion_tokens / b.wall_seconds if b.wall_seconds else 0.0
        dps = args.clients * b.decode_tokens / b.decode_seconds if b.decode_seconds else 0.0
        rows.append({"setting": name, "requests": b.requests, "activated_per_layer": layers,
                     "peak_gpu_experts": peak, "tokens_per_s": tps, "decode_tokens_per_s": dps,
                     "accuracy": r["accuracy"]})
    return rows


def _table_row(r: dict[str, Any]) -> list[str]:
    """One row of :func:`_rows` as the cells of the printed table."""
    from xshare.models import tasks as T

    layers, peak = r["activated_per_layer"], r["peak_gpu_experts"]
    return [r["setting"], "/".join(f"{x:.1f}" for x in layers) if layers else "-",
            "-" if peak is None else f"{peak:.1f}", f"{r['tokens_per_s']:.1f}", f"{r['decode_tokens_per_s']:.1f}",
            f"{100 * r['accuracy']['overall']:.1f}%", *[f"{100 * r['accuracy'].get(t, 0.0):.0f}" for t in T.TASKS]]


def _print_figures(args: argparse.Namespace, rows: list[dict[str, Any]], metrics_text: str) -> float:
    """The off/on table, the decode speed ratio (returned) and the plugin's lines of /metrics."""
    from xshare.bench._common import format_table
    from xshare.models import tasks as T

    headers = ["selector", "experts/layer", "peak GPU", "tok/s", "decode tok/s", "exact match", *T.TASKS]
    table_rows = [_table_row(r) for r in rows]
    print()
    print(format_table(headers, table_rows))
    ratio = rows[1]["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"] \
        if rows[0]["decode_tokens_per_s"] else float("nan")
    print(f"decode tokens/s on/off = {ratio:.3f}; experts/layer = mean activated experts per MoE layer per decode "
          f"forward ('off': what SGLang's top-k activates on the same batches, recorded during the 'on' run); "
          f"peak GPU = most experts on one of {args.sim_gpus} simulated EP GPUs")
    print("\n/metrics (xshare:*):")
    for line in metrics_text.splitlines():
        if line.startswith(_METRIC_PREFIXES) and "_bucket" not in line:
            print("  " + line)
    return ratio


def run(args: argparse.Namespace) -> int:
    from xshare.bench._common import write_json_atomic
    from xshare.bench.serve.grid import Setting
    from xshare.models import tasks as T

    try:
        on = _check(args)
    except ValueError as e:
        return usage_error("xshare demo", e)
    off = Setting("off", False)
    t0 = time.monotonic()
    problems = T.heldout(args.problems, seed=args.seed)
    results, metrics_text, leftovers, server_pid = _serve(args, off, on, problems, t0)
    if results is None:
        return 1
    rows = _rows(args, results, off, on)
    ratio = _print_figures(args, rows, metrics_text)
    print(f"\ndone in {time.monotonic() - t0:.0f} s")
    if args.json:
        write_json_atomic(args.json, {"rows": rows, "decode_ratio": ratio, "leftover_processes": leftovers,
                                      "server_pid": server_pid,
                                      "seconds": time.monotonic() - t0})
    failed = [r["setting"] for r in rows if r["requests"] != args.rounds * len(problems)]
    if failed or leftovers:
        print(f"xshare demo: FAILED: unanswered requests in {failed}; leftover processes {leftovers}",
              file=sys.stderr)
        return 1
    return 0
