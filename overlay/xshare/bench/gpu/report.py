"""The report: the run's metadata and the markdown tables of ``gpu_check.md`` (the JSON is the
report dictionary itself)."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from xshare.bench.gpu.context import Context


def meta(ctx: Context) -> dict[str, Any]:
    """The report's ``meta``: mode, versions, host, device, budget, seed and commit."""
    import triton

    info: dict[str, Any] = {
        "mode": "cpu" if ctx.cpu else "cuda",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "time_budget_s": ctx.budget,
        "seed": ctx.args.seed,
        "commit": _commit(),
    }
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:  # not needed by the check itself
        info["numpy"] = None
    if not ctx.cpu:
        props = torch.cuda.get_device_properties(0)
        info.update({"device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
                     "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count})
    else:
        info["device"] = "cpu (Triton interpreter)"
    return info


def _commit() -> str | None:
    """The repository's HEAD commit, read from .git (no git binary needed)."""
    root = Path(__file__).resolve().parents[4]
    head = root / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            path = root / ".git" / ref[5:]
            if path.exists():
                return path.read_text().strip()
            packed = (root / ".git" / "packed-refs").read_text().splitlines()
            return next((ln.split()[0] for ln in packed if ln.endswith(ref[5:])), None)
        return ref
    except OSError:
        return None


def _f(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _md_selector_vs_reference(p: dict[str, Any]) -> list[str]:
    return ["| family | cases | passed |", "|---|---:|---:|",
            *[f"| {f} | {v['cases']} | {v['passed']} |" for f, v in p["families"].items()],
            "", f"**{p['status']}**: {p['passed']} of {p['run']} run ({p['cases']} planned) identical ids, "
                f"weights within 1e-6; {len(p['failures'])} failures; {p['seconds']:.1f} s", ""]


def _md_cuda_graph(p: dict[str, Any]) -> list[str]:
    return ["| backend | policy | mode | replays | all equal to reference | distinct active |",
            "|---|---|---|---:|---|---|",
            *[f"| {r['backend']} | {r['policy']} | {r['mode']} | {r['replays']} | {r['equal']} | "
              f"{r['distinct_active']} |" for r in p["runs"]],
            "", f"**{p['status']}** (T, E, k = {p['shape']})", ""]


def _md_selector_timing(p: dict[str, Any]) -> list[str]:
    return ["| B | E | k | vanilla top-k | torch selector | fused kernel | kernel / top-k |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            *[f"| {q['batch']} | {q['experts']} | {q['top_k']} | {_f(q['topk_us'])} | {_f(q['select_us'])} | "
              f"{_f(q['kernel_us'])} | {_f(q['kernel_over_topk'], '.2f')} |" for q in p["points"]],
            "", f"{p['timing']}; {p['policy']}; {p['skipped']} points skipped (time budget)", ""]


def _md_moe_layer(p: dict[str, Any]) -> list[str]:
    out = ["| layer | B | active vanilla → xshare | vanilla µs | xshare µs | kernel speed-up | selector µs "
           "| selector share | speed-up with selector | served µs | speed-up served | weights GB/s (vanilla) |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in p["rows"]:
        v, x = r["vanilla"], r["xshare"]
        served = r.get("served") or {}
        served_cell = _f(r.get("served_us")) if served.get("correct") else f"left to SGLang: {_why(served)}"
        out.append(f"| {r['model']} | {r['batch']} | {v['active_experts']:.1f} → {x['active_experts']:.1f} | "
                   f"{_f(v['us'])} | {_f(x['us'])} | {_f(r['kernel_speedup'], '.2f')} | "
                   f"{_f(r['selector_us'])} | {100 * r['selector_share']:.1f}% | "
                   f"{_f(r['speedup_with_selector'], '.2f')} | {served_cell} | {_f(r.get('speedup_served'), '.2f')} | "
                   f"{_f(v['weights_gb_per_s'], '.0f')} |")
    return [*out, "", f"**{p['status']}**; {p['kernel']}; {p['routing']}; served: the routing hook as SGLang calls "
                      f"it (part 5), in a CUDA graph; {p['skipped']} skipped", ""]


def _why(m: dict[str, Any]) -> str:
    """Why a served measurement is not correct: its fallbacks, capture error or first difference."""
    if m.get("fallback"):
        return ", ".join(f"{k} x{n}" for k, n in m["fallback"].items())
    if m.get("capture_error"):
        return f"capture failed ({m['capture_error'][:80]})"
    return (m.get("diffs") or ["-"])[0][:80]


def _md_served_path(p: dict[str, Any]) -> list[str]:
    out = ["| router | policy | B | E | k | vanilla gate µs | served µs | served / gate | with metrics µs | eager µs "
           "| backend | correct | left to SGLang |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in p["rows"]:
        m = r.get("metrics") or {}
        bad = [] if r["correct"] else [_why(r)]
        if m and not m["correct"]:
            bad.append(f"with metrics: {_why(m)}")
        out.append(f"| {r['family']} | {r.get('policy', 'xshare')} | {r['batch']} | {r['experts']} | {r['top_k']} | "
                   f"{_f(r['vanilla_us'])} | "
                   f"{_f(r['served_us'])} | {_f(r['served_over_vanilla'], '.1f')} | {_f(m.get('served_us'))} | "
                   f"{_f(r['eager_us'], '.0f')} | {r['backend'] or '-'} | {r['correct'] and m.get('correct', True)} | "
                   f"{'; '.join(bad) or '-'} |")
    logs = sorted({msg for r in p["rows"] for msg in r["log"] + ((r.get("metrics") or {}).get("log") or [])})
    return [*out, "", f"**{p['status']}**; {p['policy']}, backend setting {p['backend_setting']}; reference: "
                      f"{p['reference']}; {p['timing']}; {p['skipped']} skipped", "",
            *[f"- log: `{msg}`" for msg in logs[:6]], ""]


# each part's section: (part, heading, the result key its table needs, the table and summary)
_MD_SECTIONS: tuple[tuple[str, str, str, Callable[[dict[str, Any]], list[str]]], ...] = (
    ("selector_vs_reference", "1. Triton selector vs torch reference", "families", _md_selector_vs_reference),
    ("cuda_graph", "2. CUDA graph: in-place knob changes, replays without recapture", "runs", _md_cuda_graph),
    ("selector_timing", "3. Selector time per MoE layer call (µs)", "points", _md_selector_timing),
    ("moe_layer", "4. MoE layer: vanilla vs the selector's routing", "rows", _md_moe_layer),
    ("served_path", "5. Served path: the routing hook as SGLang calls it, in a CUDA graph (µs per MoE layer call)",
     "rows", _md_served_path),
)


def markdown(report: dict[str, Any]) -> str:
    info = report["meta"]
    out = [f"# xshare bench gpu: {info.get('device')}", "",
           f"torch {info['torch']}, triton {info['triton']}, CUDA {info.get('cuda')}, Python {info['python']}, "
           f"commit {str(info.get('commit'))[:12]}, mode {info['mode']}; total {report.get('seconds', 0):.0f} s", ""]
    parts = report["parts"]
    for name, heading, needs, table in _MD_SECTIONS:
        if name in parts:
            p = parts[name]
            out += [f"## {heading}", ""]
            if needs in p:
                out += table(p)
            out += _error(p)
    return "\n".join(out) + "\n"


def _error(p: dict[str, Any]) -> list[str]:
    return [f"**error**: `{p['error'].splitlines()[-1]}`", ""] if p.get("error") else []
