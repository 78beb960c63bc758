"""``xshare bench serve``: the selector inside a real SGLang server, off vs every policy and budget.

One server build, one run: the server starts once with the plugin loaded, the selector off and the
admin endpoint on (``XSHARE_ADMIN_TOKEN``); every setting is switched in at runtime with ``PUT
/xshare/config`` (docs/sglang.md), so all settings share the process, the weights, the KV pool and
the machine's state. For each setting, 16 clients (threads) send held-out problems of
:mod:`xshare.models.tasks` greedily (temperature 0, ``max_new_tokens`` = longest answer + EOS), in
waves: each client sends one request per wave and the next wave starts when the wave is answered,
so every wave is one prefill then batched decode. The same problems go to every setting, and the
settings are visited in an interleaved order for ``--rounds`` rounds (off first in each round,
then the others; each round in a shifted order) to spread CPU noise over all of them.

Figures per setting (pooled over rounds):

* ``decode_tokens_per_s`` = clients x (decode tokens / decode seconds) over the requests, from each
  response's ``meta_info`` (decode tokens = completion tokens - 1, decode seconds = ``e2e_latency`` -
  ``first_token_latency``): the output rate of ``clients`` concurrent streams once their first token
  is out (= clients / time per output token). ``tokens_per_s`` = completion tokens / wall time of
  the waves (prefill included). Both with their ratio to ``off``.
* ``activated_per_layer``: mean activated experts per MoE layer per decode forward, from the
  server's ``/metrics`` (``xshare:active_experts`` histogram sum / count, difference over the
  setting's waves); ``vanilla_per_layer``: what SGLang's own top-k would have activated on the same
  rows (``xshare:vanilla_active_experts``). With the selector off the plugin records nothing; the
  ``off`` row shows the vanilla figures of the enabled settings' batches (and ``topk`` measures
  them directly).
* ``peak_gpu_experts``: under a simulated EP placement (``XSHARE_SIM_GPUS``, experts placed
  contiguously over ``--sim-gpus`` virtual GPUs), the most experts any one GPU must run per layer
  per decode forward, mean over forwards (``xshare:peak_gpu_active_experts``), and the same for
  vanilla top-k: the straggler GPU bounds an EP layer's time.
* ``accuracy``: exact match per task and overall (:func:`xshare.models.tasks.accuracy`).

Results: JSON (``--out DIR``/serve.json) and ``accuracy_vs_experts.png`` / ``speed_vs_experts.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xshare._http import request
from xshare.bench._common import format_table, write_json_atomic

MODE = "serve"
HELP = "a real SGLang server: selector off vs policies and budgets (tokens/s, experts, exact match)"

DEFAULT_POLICIES = ("xshare", "lynx", "des_vote", "oea")
DEFAULT_BUDGETS = (0.25, 0.5, 0.75)
SERVER_THREADS = 1
DEFAULT_OEA_K0 = (1, 2)
BUDGETED = ("xshare", "xshare_ep", "lynx", "des_vote", "des_seq")
SUPPORTED = BUDGETED + ("oea", "topk")
METRIC_NAMES = ("xshare:active_experts", "xshare:vanilla_active_experts", "xshare:peak_gpu_active_experts",
                "xshare:vanilla_peak_gpu_active_experts", "xshare:mass_kept", "xshare:top1_kept")


# -- settings -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One selector setting of the sweep: ``off`` or a policy with its budget / warm-up."""

    name: str
    enabled: bool
    policy: str = "topk"
    budget: int | float = 0.5
    warmup_k: int = 1

    def body(self) -> dict[str, Any]:
        """The ``PUT /xshare/config`` body."""
        return {"enabled": self.enabled, "policy": self.policy, "budget": self.budget, "warmup_k": self.warmup_k}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "enabled": self.enabled, "policy": self.policy if self.enabled else None,
                "budget": self.budget if self.enabled and self.policy in BUDGETED else None,
                "warmup_k": self.warmup_k if self.enabled and self.policy != "topk" else None}


def _fmt_budget(b: int | float) -> str:
    return str(b) if isinstance(b, int) else f"{b:g}"


def build_settings(policies: Sequence[str], budgets: Sequence[int | float], oea_k0: Sequence[int], *,
                   warmup_k: int = 1, include_topk: bool = True) -> list[Setting]:
    """``off`` (always first), ``topk`` (optional), each budgeted policy x budget, ``oea`` x k0."""
    out = [Setting("off", False)]
    if include_topk:
        out.append(Setting("topk", True, "topk"))
    for p in policies:
        if p not in SUPPORTED:
            raise ValueError(f"--policy: {p!r} is not supported here; choose from {', '.join(SUPPORTED)}")
        if p == "topk":
            if not include_topk:
                out.append(Setting("topk", True, "topk"))
            continue
        if p == "oea":
            out.extend(Setting(f"oea@k0={k}", True, "oea", warmup_k=k) for k in oea_k0)
        else:
            out.extend(Setting(f"{p}@{_fmt_budget(b)}", True, p, b, warmup_k) for b in budgets)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate settings: {names}")
    return out


def parse_budget(text: str) -> int | float:
    """--budget: an int >= 1 or a fraction of E in (0, 1] (ValueError naming the flag)."""
    from xshare.selection.config import parse_count

    return parse_count(text, "--budget")


# -- the model --------------------------------------------------------------------------------------
def resolve_model(model_dir: str | os.PathLike | None, log: Callable[[str], None] | None = print) -> Path:
    """The trained tiny model: ``model_dir`` as it is if it holds a model (config.json and weights),
    else built there with the default config; without ``model_dir`` the default cache
    (:func:`xshare.models.cache.ensure_model`: loaded if intact, else trained)."""
    from xshare.models.cache import ensure_model
    from xshare.models.store import WEIGHTS

    if model_dir is None:
        return ensure_model(log=log)
    d = Path(model_dir)
    if (d / "config.json").is_file() and (d / WEIGHTS).is_file():
        return d
    return ensure_model(d, log=log)


# -- the server and its endpoints ---------------------------------------------------------------------
class Client:
    """HTTP client of one running server: generate, admin config, /metrics."""

    def __init__(self, base_url: str, token: str | None, timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None, auth: bool = False) -> tuple[int, Any]:
        return request(self.base_url + path, method, self.token if auth else None, body, self.timeout,
                       text=path == "/metrics")

    def generate(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        status, out = self._request("POST", "/generate", {
            "text": prompt, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}})
        if status != 200 or not isinstance(out, dict) or "text" not in out:
            raise RuntimeError(f"/generate answered {status}: {str(out)[:300]}")
        return out

    def set_config(self, setting: Setting) -> dict[str, Any]:
        status, out = self._request("PUT", "/xshare/config", setting.body(), auth=True)
        if status != 200:
            raise RuntimeError(f"PUT /xshare/config {setting.body()} answered {status}: {str(out)[:500]}")
        if out.get("config", {}).get("enabled") != setting.enabled or not out.get("consistent", False):
            raise RuntimeError(f"PUT /xshare/config: the ranks did not take {setting.body()}: {out}")
        return out

    def enable(self, on: bool) -> dict[str, Any]:
        status, out = self._request("POST", "/xshare/enable" if on else "/xshare/disable", None, auth=True)
        if status != 200:
            raise RuntimeError(f"POST /xshare/{'enable' if on else 'disable'} answered {status}: {str(out)[:500]}")
        return out

    def metrics_text(self) -> str:
        status, out = self._request("GET", "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status} (is the server started with --enable-metrics?)")
        return str(out)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def parse_metrics(text: str, prefix: str = "xshare:") -> dict[tuple[str, str], float]:
    """{(sample name, labels without rank), value} of the ``prefix`` samples, summed over ranks."""
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or not m.group(1).startswith(prefix):
            continue
        labels = ",".join(p for p in (m.group(2) or "{}")[1:-1].split(",") if p and not p.startswith("rank="))
        key = (m.group(1), labels)
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def _hist_mean(now: dict, before: dict, name: str, labels: str = "") -> float | None:
    s = now.get((name + "_sum", labels), 0.0) - before.get((name + "_sum", labels), 0.0)
    c = now.get((name + "_count", labels), 0.0) - before.get((name + "_count", labels), 0.0)
    return s / c if c > 0 else None


def _mode_total(snapshot: dict, name: str, mode: str) -> float:
    return sum(v for (n, lab), v in snapshot.items() if n == name and f'mode="{mode}"' in lab.split(","))


def window_figures(before: dict, now: dict) -> dict[str, Any]:
    """Per-setting figures from two /metrics snapshots."""
    fwd_s, moe_s, fwd_n = (_mode_total(now, n, "decode") - _mode_total(before, n, "decode") for n in
                           ("xshare:forward_seconds_total", "xshare:moe_seconds_total", "xshare:forwards_total"))
    layers = sorted({int(lab.split('"')[1]) for (n, lab) in now if n == "xshare:active_experts_count" and lab})
    act = [_hist_mean(now, before, "xshare:active_experts", f'layer="{i}"') for i in layers]
    van = [_hist_mean(now, before, "xshare:vanilla_active_experts", f'layer="{i}"') for i in layers]
    forwards = now.get(("xshare:active_experts_count", f'layer="{layers[0]}"'), 0.0) - \
        before.get(("xshare:active_experts_count", f'layer="{layers[0]}"'), 0.0) if layers else 0.0
    return {
        "forwards": int(forwards),
        "activated_per_layer": act if any(a is not None for a in act) else None,
        "vanilla_per_layer": van if any(v is not None for v in van) else None,
        "peak_gpu_experts": _hist_mean(now, before, "xshare:peak_gpu_active_experts"),
        "vanilla_peak_gpu_experts": _hist_mean(now, before, "xshare:vanilla_peak_gpu_active_experts"),
        "mass_kept": _hist_mean(now, before, "xshare:mass_kept"),
        "top1_kept": _hist_mean(now, before, "xshare:top1_kept"),
        # XSHARE_PROFILE (the bench turns it on): host time of decode forwards and of their MoE blocks
        "decode_forward_ms": 1e3 * fwd_s / fwd_n if fwd_n > 0 else None,
        "moe_share_decode": moe_s / fwd_s if fwd_s > 0 else None,
    }


def settled_metrics(client: Client, timeout: float = 20.0) -> dict[tuple[str, str], float]:
    """A /metrics snapshot once the plugin has flushed (its counts stop changing; it flushes on idle)."""
    prev = None
    deadline = time.monotonic() + timeout
    while True:
        cur = parse_metrics(client.metrics_text())
        counts = {k: v for k, v in cur.items() if k[0].endswith("_count") or k[0].endswith("_total")}
        if prev is not None and counts == prev:
            return cur
        if time.monotonic() > deadline:
            return cur
        prev = counts
        time.sleep(0.4)


def start_server(model_dir: str | os.PathLike, *, token: str, sim_gpus: int, log_path: str | os.PathLike | None,
                 dtype: str = "float32", extra_env: dict[str, str] | None = None, port: int | None = None,
                 threads: int | None = SERVER_THREADS,
                 startup_timeout: float = 300.0) -> Any:
    """A real SGLang server with the plugin, selector off, admin endpoint and /metrics on.

    ``threads``: OMP_NUM_THREADS of the server (None or 0: the environment's). One by default: on a
    small CPU the scheduler shares the cores with the tokenizer, the detokenizer, the HTTP server and
    the clients, and a second torch thread mostly waits for a core (twice the decode speed measured
    on 2 cores with one thread, selector off)."""
    from xshare.sglang.server import ServerProcess

    env = {"XSHARE_ADMIN_TOKEN": token, "XSHARE_SIM_GPUS": str(sim_gpus), "XSHARE_PROFILE": "1", **(extra_env or {})}
    if threads:  # torch threads of the server's processes (the scheduler runs the model)
        env.setdefault("OMP_NUM_THREADS", str(threads))
    srv = ServerProcess(model_dir, port, xshare_args=["--xshare-disable"],
                        sglang_args=["--enable-metrics", "--dtype", dtype], env=env, log_path=log_path,
                        startup_timeout=startup_timeout)
    return srv.start()


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server-threads", type=int, default=SERVER_THREADS, metavar="N",
                   help=f"OMP_NUM_THREADS of the server (default {SERVER_THREADS}; 0 = the environment's)")


# -- one batch --------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    texts: list[str]
    completion_tokens: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    wall_seconds: float = 0.0
    requests: int = 0
    errors: list[str] = field(default_factory=list)

    @classmethod
    def pool(cls, batches: Sequence[BatchResult]) -> BatchResult:
        """Several rounds of the same prompts as one result (texts concatenated, counts summed)."""
        out = cls(texts=[t for b in batches for t in b.texts], errors=[e for b in batches for e in b.errors])
        for name in ("completion_tokens", "decode_tokens", "decode_seconds", "wall_seconds", "requests"):
            setattr(out, name, sum(getattr(b, name) for b in batches))
        return out


def run_waves(client: Client, prompts: Sequence[str], clients: int, max_new_tokens: int) -> BatchResult:
    """Send ``prompts`` from ``clients`` threads, one request per client per wave."""
    res = BatchResult(texts=[""] * len(prompts))
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            out = client.generate(prompts[i], max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - counted, reported, makes the run fail
            with lock:
                res.errors.append(f"{prompts[i]!r}: {exc}")
            return
        meta = out.get("meta_info", {})
        n = int(meta.get("completion_tokens", 0))
        dec = float(meta.get("e2e_latency", 0.0)) - float(meta.get("first_token_latency", 0.0))
        with lock:
            res.texts[i] = out["text"]
            res.completion_tokens += n
            res.requests += 1
            if n > 1 and dec > 0:
                res.decode_tokens += n - 1
                res.decode_seconds += dec

    with cf.ThreadPoolExecutor(clients) as ex:
        for start in range(0, len(prompts), clients):
            t0 = time.perf_counter()
            list(ex.map(one, range(start, min(start + clients, len(prompts)))))
            res.wall_seconds += time.perf_counter() - t0
    return res


# -- the sweep --------------------------------------------------------------------------------------
def _round_order(settings: Sequence[Setting], r: int) -> list[Setting]:
    """Round r: off first, then the others rotated by r (and reversed on odd rounds)."""
    rest = list(settings[1:])
    if rest:
        k = r % len(rest)
        rest = rest[k:] + rest[:k]
        if r % 2:
            rest.reverse()
    return [settings[0], *rest]


def sweep(client: Client, settings: Sequence[Setting], problems: Sequence[Any], *, clients: int, rounds: int,
          max_new_tokens: int, warmup_requests: int = 16,
          log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run every setting ``rounds`` times on the same ``problems``; per-setting figures."""
    from xshare.models import tasks as T

    prompts = [p.prompt for p in problems]
    client.set_config(settings[0])
    if warmup_requests:
        warm = [p.prompt for p in T.heldout(warmup_requests, seed=10_000)]
        run_waves(client, warm, clients, max_new_tokens)
    batches: dict[str, list[BatchResult]] = {s.name: [] for s in settings}
    windows: dict[str, list[tuple[dict, dict]]] = {s.name: [] for s in settings}
    errors: list[str] = []
    for r in range(rounds):
        for s in _round_order(settings, r):
            client.set_config(s)
            before = settled_metrics(client)
            b = run_waves(client, prompts, clients, max_new_tokens)
            after = settled_metrics(client)
            batches[s.name].append(b)
            windows[s.name].append((before, after))
            errors.extend(f"{s.name}: {e}" for e in b.errors)
            if log is not None:
                dps = clients * b.decode_tokens / b.decode_seconds if b.decode_seconds else 0.0
                log(f"  round {r + 1}/{rounds} {s.name:<16} {b.requests}/{len(prompts)} answered, "
                    f"{b.completion_tokens / b.wall_seconds:7.1f} tok/s, decode {dps:7.1f} tok/s")
    client.set_config(settings[0])
    rows = []
    for s in settings:
        a = BatchResult.pool(batches[s.name])
        row = {**s.to_dict(), "requests": a.requests, "expected_requests": rounds * len(problems),
               "completion_tokens": a.completion_tokens, "decode_tokens": a.decode_tokens,
               "wall_seconds": round(a.wall_seconds, 3),
               "tokens_per_s": a.completion_tokens / a.wall_seconds if a.wall_seconds else None,
               "decode_tokens_per_s": clients * a.decode_tokens / a.decode_seconds if a.decode_seconds else None,
               "accuracy": T.accuracy(list(problems) * rounds, a.texts),
               "outputs_identical_across_rounds": all(b.texts == batches[s.name][0].texts for b in batches[s.name]),
               **merge_windows(windows[s.name])}
        rows.append(row)
    _fill_off(rows)
    return {"rows": rows, "errors": errors}


def merge_windows(windows: list[tuple[dict, dict]]) -> dict[str, Any]:
    """Pool several (before, after) snapshot pairs: sum the differences, then take means."""
    before: dict = {}
    after: dict = {}
    for b, a in windows:
        for k in set(a) | set(b):
            after[k] = after.get(k, 0.0) + a.get(k, 0.0) - b.get(k, 0.0)
    return window_figures(before, after)


def _fill_off(rows: list[dict[str, Any]]) -> None:
    """Ratios to off; the off row's experts from vanilla top-k on the enabled settings' batches."""
    off = next((r for r in rows if r["name"] == "off"), None)
    if off is None:
        return
    vans = [r["vanilla_per_layer"] for r in rows if r["enabled"] and r.get("vanilla_per_layer")]
    peaks = [r["vanilla_peak_gpu_experts"] for r in rows if r["enabled"] and r.get("vanilla_peak_gpu_experts")]
    if vans:
        off["activated_per_layer"] = [sum(v[i] for v in vans) / len(vans) for i in range(len(vans[0]))]
        off["vanilla_per_layer"] = off["activated_per_layer"]
        off["experts_source"] = "vanilla top-k on the enabled settings' decode batches (the plugin records nothing " \
                                "while off)"
    if peaks:
        off["peak_gpu_experts"] = off["vanilla_peak_gpu_experts"] = sum(peaks) / len(peaks)
    for r in rows:
        for key in ("tokens_per_s", "decode_tokens_per_s"):
            r[key + "_ratio"] = r[key] / off[key] if r.get(key) and off.get(key) else None
        r["activated"] = (sum(r["activated_per_layer"]) / len(r["activated_per_layer"])
                          if r.get("activated_per_layer") else None)
        r["accuracy_delta_points"] = 100 * (r["accuracy"]["overall"] - off["accuracy"]["overall"])


# -- output ------------------------------------------------------------------------------------------
def _f(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    headers = ["setting", "experts/layer", "peak GPU", "fwd ms", "MoE %", "tok/s", "decode tok/s", "x off", "exact",
               "d pts", *tasks]
    out = []
    for r in rows:
        layers = "/".join(_f(a) for a in r["activated_per_layer"]) if r.get("activated_per_layer") else "-"
        share = r.get("moe_share_decode")
        out.append([r["name"], layers, _f(r.get("peak_gpu_experts")), _f(r.get("decode_forward_ms")),
                    _f(None if share is None else 100 * share, ".0f"), _f(r.get("tokens_per_s")),
                    _f(r.get("decode_tokens_per_s")), _f(r.get("decode_tokens_per_s_ratio"), ".3f"),
                    _f(100 * r["accuracy"]["overall"]), _f(r.get("accuracy_delta_points"), "+.1f"),
                    *[_f(100 * r["accuracy"].get(t, 0.0), ".0f") for t in tasks]])
    return format_table(headers, out)


def plot(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """accuracy_vs_experts.png and speed_vs_experts.png (one series per policy; off and topk as marks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("activated") is None:
            continue
        series.setdefault(r["policy"] if r["enabled"] else "off", []).append(r)
    paths = []
    for key, ylabel, fname, scale in (("accuracy", "exact match (%)", "accuracy_vs_experts.png", 100.0),
                                      ("decode_tokens_per_s", "decode tokens/s", "speed_vs_experts.png", 1.0)):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for name, rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: r["activated"])
            xs = [r["activated"] for r in rs]
            ys = [(r["accuracy"]["overall"] if key == "accuracy" else (r[key] or 0.0)) * scale for r in rs]
            marker = {"off": "*", "topk": "s"}.get(name, "o")
            ax.plot(xs, ys, marker=marker, markersize=10 if name == "off" else 6, label=name,
                    linestyle="none" if len(rs) == 1 else "-")
        ax.set_xlabel("activated experts per layer (mean per decode forward)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / fname
        tmp = out_dir / f".{fname}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)
        paths.append(path)
    return paths


# -- CLI -----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("Example (the issue's sweep):\n"
                "  xshare bench serve --out results/serve\n"
                "  xshare bench serve --policy xshare --budget 0.5 --problems 32 --rounds 1 --out /tmp/quick\n"
                "See docs/benchmark.md.")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for serve.json and the plots")
    p.add_argument("--model-dir", metavar="DIR", help="trained tiny model (default: the cache; built if missing)")
    p.add_argument("--url", metavar="URL",
                   help="use a running server (started with --enable-metrics and XSHARE_ADMIN_TOKEN) "
                        "instead of starting one")
    p.add_argument("--policy", action="append", metavar="NAME",
                   help=f"policy (repeatable; default {', '.join(DEFAULT_POLICIES)}); off and topk always run")
    p.add_argument("--budget", action="append", metavar="M",
                   help="budget of budgeted policies: int or fraction of E (repeatable; default 0.25, 0.5, 0.75)")
    p.add_argument("--oea-k0", action="append", type=int, metavar="K0", help="oea warm-up k0 (repeatable; 1, 2)")
    p.add_argument("--warmup-k", type=int, default=1, help="warm-up k0 of the budgeted policies (default 1)")
    p.add_argument("--no-topk", action="store_true", help="leave out the topk setting")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--problems", type=int, default=80, help="held-out problems per setting and round (80)")
    p.add_argument("--seed", type=int, default=0, help="held-out sample seed (default 0)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all settings, interleaved (default 2)")
    p.add_argument("--sim-gpus", type=int, default=4, help="simulated EP size for peak GPU load (default 4)")
    p.add_argument("--dtype", default="float32", help="server --dtype (default float32)")
    add_threads_argument(p)
    p.add_argument("--token", help="admin token for --url (default $XSHARE_ADMIN_TOKEN)")


def _check(args: argparse.Namespace) -> tuple[list[Setting], list[Any]]:
    from xshare.models import tasks as T

    for name in ("clients", "problems", "rounds", "sim_gpus"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    budgets = [parse_budget(b) for b in (args.budget or [str(b) for b in DEFAULT_BUDGETS])]
    k0 = args.oea_k0 or list(DEFAULT_OEA_K0)
    if any(k < 1 for k in k0):
        raise ValueError(f"--oea-k0 must be >= 1, got {k0}")
    settings = build_settings(args.policy or list(DEFAULT_POLICIES), budgets, k0, warmup_k=args.warmup_k,
                              include_topk=not args.no_topk)
    return settings, T.heldout(args.problems, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from xshare.models import tasks as T

    try:
        settings, problems = _check(args)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: exists and is not a directory")
    except ValueError as e:
        print(f"xshare bench serve: error: {e}", file=sys.stderr)
        return 2
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
                               dtype=args.dtype, threads=args.server_threads)
            print(f"  ready in {srv.startup_seconds:.0f} s ({srv.base_url})", flush=True)
            client = Client(srv.base_url, token)
            model_desc = _model_desc(model)
        print(f"  {len(settings)} settings x {args.rounds} rounds x {len(problems)} problems, "
              f"{args.clients} clients", flush=True)
        res = sweep(client, settings, problems, clients=args.clients, rounds=args.rounds,
                    max_new_tokens=T.MAX_ANSWER_CHARS + 1)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"xshare bench serve: error: {e}", file=sys.stderr)
        if srv is not None:
            print(srv.log_tail(3000), file=sys.stderr)
        return 1
    finally:
        leftovers = srv.stop() if srv is not None else []
    meta = {"clients": args.clients, "problems": len(problems), "seed": args.seed, "rounds": args.rounds,
            "max_new_tokens": T.MAX_ANSWER_CHARS + 1, "sim_gpus": args.sim_gpus, "dtype": args.dtype,
            "server_threads": args.server_threads,
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


def _model_desc(model: Path) -> dict[str, Any]:
    from xshare.models.store import read_manifest

    man = read_manifest(model) or {}
    return {"dir": str(model), "identity": man.get("identity"), "config": man.get("config"),
            "heldout_offline": man.get("heldout")}
