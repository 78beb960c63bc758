"""``xshare bench soak``: concurrent clients against a real server while its config changes all the time.

    xshare bench soak                              # 32 clients, 180 s, the trained tiny model, one rank
    xshare bench soak --tp 2 --json soak.json      # two tensor-parallel ranks
    xshare bench soak --url http://127.0.0.1:30000 --token-file T --pgid 1234   # a server already running

``--clients`` threads send ``/generate`` requests (greedy, ``ignore_eos``, ``--max-new-tokens`` each) for
``--duration`` seconds or ``--max-requests`` requests, whichever comes first; meanwhile, every
``--change-every`` seconds, the config changes through the admin API (``PUT``/``PATCH /xshare/config``): a random
valid config (a registered policy with random values of the knobs it reads, checked against the served model with
:func:`xshare.selection.registry.validate`), an enable/disable flip, or an invalid change (unknown field or policy,
a budget outside [top_k, E], a wrong type, ...), which must be refused. At the end it prints:

* failed requests (an error or a non-200 answer) and truncated ones (fewer tokens than asked): both must be 0;
* selector fallbacks (``xshare:fallbacks_total`` on ``/metrics``) other than injected faults: must be 0;
* changes acknowledged / refused, invalid changes accepted, admin errors (5xx);
* whether every rank of ``GET /xshare/config`` is on the last acknowledged version and config;
* the resident memory of every server process after the warm-up and at the end, and whether each stayed within
  the margin (``--rss-margin-pct`` of its start plus ``--rss-margin-mib``).

The exit status is 1 when an invariant fails. Loopback only: the server URL must be 127.0.0.1, ::1 or localhost.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import secrets
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from xshare._http import request
from xshare.bench._soak_traffic import Shape, Traffic, run_traffic

MODE = "soak"
HELP = "soak test: concurrent clients while the config changes every 2 s (failures, fallbacks, config, memory)"

LOOPBACK = ("127.0.0.1", "::1", "localhost")
INJECTED = "InjectedFault"  # the fallback reason of XSHARE_FAULT_INJECT


def model_shape_of(base_url: str) -> Shape:
    """The served model's (E, top_k), from its config.json (``/get_model_info`` names the model path; loopback, so
    the same machine)."""
    from xshare.sglang.model_shape import moe_shape

    status, info = request(base_url + "/get_model_info", "GET", timeout=30)
    if status != 200 or not isinstance(info, dict) or "model_path" not in info:
        raise RuntimeError(f"/get_model_info answered {status}: {info}")
    cfg = json.loads((Path(info["model_path"]) / "config.json").read_text())
    top_k, e = moe_shape(argparse.Namespace(**cfg))
    if not top_k or not e:
        raise RuntimeError(f"{info['model_path']}: not an MoE model config (top_k {top_k}, E {e})")
    return Shape(num_experts=e, top_k=top_k)


# -- the server's state --------------------------------------------------------------------------------------
def fallbacks(base_url: str) -> dict[str, float]:
    """reason -> count of ``xshare:fallbacks_total`` on ``/metrics``, summed over ranks."""
    status, text = request(base_url + "/metrics", "GET", timeout=30, text=True)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status} (start the server with --enable-metrics)")
    out: dict[str, float] = {}
    for m in re.finditer(r'^xshare:fallbacks_total\{([^}]*)\} (\S+)$', text, re.M):
        reason = re.search(r'reason="([^"]*)"', m.group(1))
        key = reason.group(1) if reason else ""
        out[key] = out.get(key, 0.0) + float(m.group(2))
    return out


def rss_mib(pids: list[int]) -> dict[int, float]:
    """pid -> resident set size in MiB (/proc/PID/status VmRSS); a process that is gone is left out."""
    out = {}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[pid] = int(line.split()[1]) / 1024
        except OSError:
            continue
    return out


def process_titles(pids: list[int]) -> dict[int, str]:
    out = {}
    for pid in pids:
        try:
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()[:60]
        except OSError:
            out[pid] = "?"
    return out


# -- the soak ----------------------------------------------------------------------------------------------------
def check_loopback(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        raise ValueError(f"--url {url!r}: the soak runs on loopback only ({', '.join(LOOPBACK)})")
    return url.rstrip("/")


def _memory(pids: list[int], rss_start: dict[int, float], rss_end: dict[int, float], margin_pct: float,
            margin_mib: float) -> list[dict[str, Any]]:
    """Per server process: its RSS at the start and the end, the limit, and whether it stayed within."""
    memory = []
    titles = process_titles(pids)
    for pid in pids:
        a, b = rss_start.get(pid), rss_end.get(pid)
        limit = None if a is None else a * (1 + margin_pct / 100) + margin_mib
        memory.append({"pid": pid, "process": titles.get(pid, "?"), "start_mib": a, "end_mib": b,
                       "limit_mib": limit, "ok": a is not None and b is not None and b <= limit})
    return memory


def soak(base_url: str, token: str, *, clients: int = 32, duration: float = 180.0, change_every: float = 2.0,
         max_requests: int = 100_000, max_new_tokens: int = 16, pids: list[int] | None = None, seed: int = 0,
         rss_margin_pct: float = 10.0, rss_margin_mib: float = 64.0, log: Any = print) -> dict[str, Any]:
    """Run the soak against ``base_url`` (loopback) and return its figures (see the module docstring)."""
    base_url = check_loopback(base_url)
    shape = model_shape_of(base_url)
    pids = list(pids or [])
    traffic = Traffic(base_url, token, shape, max_new_tokens, random.Random(seed))

    log(f"soak: {base_url}, model E={shape.num_experts} top_k={shape.top_k}; warm-up ({clients} requests) ...")
    warm_counts = traffic.warm_up(clients)
    fallbacks_start = fallbacks(base_url)
    rss_start = rss_mib(pids)
    status, state = request(base_url + "/xshare/config", "GET", token=token, timeout=60)
    if status != 200:
        raise RuntimeError(f"GET /xshare/config answered {status}: {state} (is the admin token right?)")
    last_ack = traffic.last_ack
    last_ack.update(version=state["version"], config=state["config"])

    log(f"soak: {clients} clients for {duration:.0f} s (at most {max_requests} requests), a config change every "
        f"{change_every:g} s ...")
    elapsed = run_traffic(traffic, clients, duration, change_every, max_requests)
    time.sleep(1.5)  # the schedulers go idle and flush their last metrics window
    fallbacks_end = fallbacks(base_url)
    rss_end = rss_mib(pids)
    status, final = request(base_url + "/xshare/config", "GET", token=token, timeout=60)
    ranks = final.get("ranks", []) if isinstance(final, dict) else []
    on_last = [r.get("version") == last_ack["version"] and r.get("config") == last_ack["config"] for r in ranks]
    unexpected = {r: fallbacks_end.get(r, 0.0) - fallbacks_start.get(r, 0.0) for r in fallbacks_end
                  if r != INJECTED and fallbacks_end.get(r, 0.0) > fallbacks_start.get(r, 0.0)}
    memory = _memory(pids, rss_start, rss_end, rss_margin_pct, rss_margin_mib)
    counts, changes = traffic.counts, traffic.changes
    result = {
        "url": base_url, "model": {"num_experts": shape.num_experts, "top_k": shape.top_k},
        "clients": clients, "duration_s": round(elapsed, 1), "max_new_tokens": max_new_tokens,
        "warmup": warm_counts, **counts, "errors": traffic.errors,
        "changes": changes, "change_problems": traffic.change_log[:20],
        "fallbacks_unexpected": unexpected,
        "last_acknowledged": last_ack, "final_status": status,
        "ranks": [{"rank": r.get("rank"), "version": r.get("version")} for r in ranks],
        "every_rank_on_last_ack": bool(ranks) and all(on_last),
        "memory": memory, "rss_margin": {"pct": rss_margin_pct, "mib": rss_margin_mib},
    }
    result["ok"] = bool(counts["failed"] == 0 and counts["truncated"] == 0 and warm_counts["failed"] == 0
                        and warm_counts["truncated"] == 0 and not unexpected and result["every_rank_on_last_ack"]
                        and changes["admin_errors"] == 0 and all(m["ok"] for m in memory))
    return result


def report(r: dict[str, Any]) -> str:
    c = r["changes"]
    lines = [
        f"soak {r['url']}: {r['clients']} clients, {r['duration_s']:.0f} s, {r['max_new_tokens']} tokens per request",
        f"  requests: {r['requests']} ({r['requests'] / max(r['duration_s'], 1e-9):.1f}/s), "
        f"completed {r['completed']}, failed {r['failed']}, truncated {r['truncated']} "
        f"(warm-up: {r['warmup']['requests']} requests, failed {r['warmup']['failed']}, "
        f"truncated {r['warmup']['truncated']})",
        f"  config changes: {c['valid_sent']} valid sent ({c['toggles']} enable/disable), {c['acknowledged']} "
        f"acknowledged, {c['valid_refused']} valid refused; {c['invalid_sent']} invalid sent, {c['invalid_refused']} "
        f"refused, {c['invalid_accepted']} accepted; admin errors {c['admin_errors']}",
        f"  selector fallbacks not caused by injection: {sum(r['fallbacks_unexpected'].values()):.0f}"
        + (f" {r['fallbacks_unexpected']}" if r["fallbacks_unexpected"] else ""),
        f"  final config: last acknowledged v{r['last_acknowledged']['version']} "
        f"({json.dumps(r['last_acknowledged']['config'], sort_keys=True)}); ranks "
        + ", ".join(f"{x['rank']}: v{x['version']}" for x in r["ranks"])
        + f" -> every rank on it: {'yes' if r['every_rank_on_last_ack'] else 'NO'}",
        f"  memory (RSS, MiB; margin {r['rss_margin']['pct']:g} % + {r['rss_margin']['mib']:g} MiB):",
    ]
    for m in r["memory"]:
        def mib(v: float | None) -> str:
            return "gone" if v is None else f"{v:.0f}"
        delta = "" if m["start_mib"] is None or m["end_mib"] is None else f"{m['end_mib'] - m['start_mib']:+.0f}"
        limit = "-" if m["limit_mib"] is None else f"{m['limit_mib']:.0f}"
        lines.append(f"    pid {m['pid']} {m['process']}: {mib(m['start_mib'])} -> {mib(m['end_mib'])} ({delta}; "
                     f"limit {limit}) {'ok' if m['ok'] else 'OVER'}")
    for p in r["change_problems"] + r["errors"]:
        lines.append(f"  ! {p}")
    lines.append(f"  result: {'PASS' if r['ok'] else 'FAIL'}")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="a running server (loopback; its admin endpoint and --enable-metrics on); default: "
                                 "start one")
    p.add_argument("--token", help="admin token of --url")
    p.add_argument("--token-file", type=Path, help="file holding the admin token of --url")
    p.add_argument("--pgid", type=int, help="process group of --url's server (its processes' memory is measured)")
    p.add_argument("--model-dir", help="model of the started server (default: the trained tiny model of the cache)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of the started server (default 1)")
    p.add_argument("--sim-gpus", type=int, default=4, help="simulated GPUs of the started server (default 4)")
    p.add_argument("--log", type=Path, help="the started server's log (default: a temporary file)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of traffic (default 180)")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests (default 100000)")
    p.add_argument("--change-every", type=float, default=2.0, help="seconds between config changes (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per request (default 16)")
    p.add_argument("--rss-margin-pct", type=float, default=10.0, help="memory margin, %% of the start (default 10)")
    p.add_argument("--rss-margin-mib", type=float, default=64.0, help="memory margin, MiB on top (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures as JSON")


def _check(args: argparse.Namespace) -> str | None:
    for name in ("clients", "max_requests", "max_new_tokens", "tp", "sim_gpus"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    for name in ("duration", "change_every"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            return f"--{name.replace('_', '-')} must be > 0"
    if args.duration > 3600:
        return "--duration is at most 3600 s (the soak is bounded)"
    if args.url:
        try:
            check_loopback(args.url)
        except ValueError as exc:
            return str(exc)
        if not (args.token or args.token_file):
            return "--url needs --token or --token-file"
    return None


def run(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem:
        print(f"xshare bench soak: {problem}", file=sys.stderr)
        return 2
    kw = dict(clients=args.clients, duration=args.duration, change_every=args.change_every,
              max_requests=args.max_requests, max_new_tokens=args.max_new_tokens, seed=args.seed,
              rss_margin_pct=args.rss_margin_pct, rss_margin_mib=args.rss_margin_mib)
    if args.url:
        from xshare.sglang.server import group_processes

        token = args.token or args.token_file.read_text().strip()
        result = soak(args.url, token, pids=group_processes(args.pgid) if args.pgid else [], **kw)
    else:
        result = soak_own_server(args.model_dir, tp=args.tp, sim_gpus=args.sim_gpus, log_path=args.log, **kw)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0 if result["ok"] else 1


def soak_own_server(model_dir: str | None, *, tp: int = 1, sim_gpus: int = 4, log_path: Path | None = None,
                    **kw: Any) -> dict[str, Any]:
    """Start a server (``xshare serve``: the model, ``--tp``, ``--enable-metrics``, the admin endpoint, the
    selector on), soak it, stop it; the result also says whether the stop left a process behind."""
    import tempfile

    from xshare.bench.serve.server import resolve_model
    from xshare.sglang.server import ServerProcess, group_processes

    model = resolve_model(model_dir)
    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="xshare-soak-") as tmp:
        srv = ServerProcess(model, xshare_args=["--xshare-policy", "xshare", "--xshare-budget", "0.5"],
                            sglang_args=["--enable-metrics", "--tp", str(tp)],
                            env={"XSHARE_ADMIN_TOKEN": token, "XSHARE_SIM_GPUS": str(sim_gpus),
                                 "OMP_NUM_THREADS": "1"},
                            log_path=log_path or Path(tmp) / "server.log", startup_timeout=600)
        srv.start()
        print(f"server {srv.base_url} ready in {srv.startup_seconds:.0f} s ({model}, --tp {tp})", flush=True)
        try:
            result = soak(srv.base_url, token, pids=group_processes(srv.proc.pid), **kw)
        finally:
            leftovers = srv.stop()
        result["server_leftovers"] = leftovers
        result["ok"] = result["ok"] and not leftovers
        return result
