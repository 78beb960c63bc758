"""Results as a JSON document (a stable schema), text and markdown tables, and the comparison of
policies at equal activated experts.

JSON: ``{"schema": "xshare-eval/1", "settings": {...}, "results": [row, ...], "matched": [...]}``;
every row has the keys listed in :data:`ROW_KEYS` (``None`` where a value does not apply).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

SCHEMA = "xshare-eval/1"
ROW_KEYS = (
    "policy", "label", "batch", "batch_tokens_mean", "num_batches", "budget", "budget_arg", "target_mass",
    "warmup_k",
    "group_budget", "gpus", "gpu_cap", "active_experts_mean", "active_experts_p50", "active_experts_p95",
    "active_experts_max", "vanilla_active_experts_mean", "reduction", "mass_kept", "top1_kept", "cap_bound",
    "peak_gpu_experts_mean", "peak_gpu_experts_max", "vanilla_peak_gpu_experts_mean", "peak_ratio",
    "peak_over_mean_gpu", "vanilla_peak_over_mean_gpu", "tokens_per_gpu_max_over_mean",
    "vanilla_tokens_per_gpu_max_over_mean", "peak_gpu_tokens_mean", "vanilla_peak_gpu_tokens_mean",
    "gpu_tokens_mean", "selector_ms_per_layer", "vanilla_selector_ms_per_layer",
    "modelled_moe_ms_per_step", "vanilla_modelled_moe_ms_per_step", "modelled_step_ms", "vanilla_modelled_step_ms",
    "moe_speedup", "otps_ratio", "gpu_load_mean", "vanilla_gpu_load_mean", "per_layer",
) + ("placement",)
# a row of a placement comparison (``--placement predictive``) fills these; null elsewhere
PLACEMENT_KEYS = (
    "replica_slots", "predictor", "replan_every", "planner", "replans", "moved_experts", "moved_bytes_per_step",
    "move_ms_per_step", "forecast", "timeline",
)
ROW_KEYS += PLACEMENT_KEYS


def document(settings: dict[str, Any], rows: Sequence[dict[str, Any]],
             matched: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    for r in rows:
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            raise ValueError(f"result row lacks {missing}")
    return {"schema": SCHEMA, "settings": settings, "results": list(rows), "matched": list(matched or [])}


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder (never a partial file)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".xshare-eval-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"


# -- equal activated experts ----------------------------------------------------------------------
def _frontier(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """Pareto frontier (fewer activated experts, more mass kept), ascending in activated experts."""
    pts = sorted(points, key=lambda p: (p[0], -p[1]))
    out: list[tuple[float, float, float]] = []
    for p in pts:
        if out and p[1] <= out[-1][1]:
            continue
        if out and p[0] == out[-1][0]:
            continue
        out.append(p)
    return out


def _interp(front: list[tuple[float, float, float]], target: float) -> tuple[float, float] | None:
    if not front or target < front[0][0] - 1e-9 or target > front[-1][0] + 1e-9:
        return None
    for a, b in zip(front, front[1:], strict=False):
        if a[0] - 1e-9 <= target <= b[0] + 1e-9:
            t = 0.0 if b[0] == a[0] else (target - a[0]) / (b[0] - a[0])
            t = min(1.0, max(0.0, t))
            return a[1] + t * (b[1] - a[1]), a[2] + t * (b[2] - a[2])
    return front[0][1], front[0][2]  # one point, at the target


def matched(rows: Sequence[dict[str, Any]], targets: Sequence[float]) -> list[dict[str, Any]]:
    """Gate mass and top-1 kept of every policy at each target number of activated experts.

    Per policy, batch size and knob (``knob``: 'target_mass' for the rows with a mass target, else
    'budget'), the settings form a curve of (activated experts, mass kept); the values are read off
    its Pareto frontier by linear interpolation between the two settings that bracket the target
    (None when the sweep does not reach the target).
    """
    out = []
    groups: dict[tuple[str, Any, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["policy"] == "topk":
            continue
        knob = "budget" if r.get("target_mass") is None else "target_mass"
        groups.setdefault((r["policy"], r["batch"], knob), []).append(r)
    for target in targets:
        for (policy, batch, knob), rs in groups.items():
            pts = [(r["active_experts_mean"], r["mass_kept"], r["top1_kept"]) for r in rs]
            front = _frontier(pts)
            got = _interp(front, float(target))
            out.append({
                "policy": policy, "batch": batch, "knob": knob, "active_experts": float(target),
                "mass_kept": None if got is None else got[0], "top1_kept": None if got is None else got[1],
                "sweep_active_range": [min(p[0] for p in pts), max(p[0] for p in pts)],
                "points": len(pts),
            })
    return out


def propose_layer_budgets(rows: Sequence[dict[str, Any]], target: float, policy: str = "xshare",
                          batch: Any = None) -> dict[str, Any] | None:
    """Per-layer budgets from a budget sweep: for every replayed layer, the smallest swept (scalar)
    budget of ``policy`` whose mass kept on that layer reaches ``target`` (the largest swept budget
    where none does). An in-sample allocation: evaluate it with ``--budget '[...]'`` against one
    global budget of the same total. None when the sweep has no scalar-budget rows of ``policy``."""
    sweep = [r for r in rows if r["policy"] == policy and r.get("target_mass") is None
             and isinstance(r.get("budget_arg"), (int, float)) and (batch is None or r["batch"] == batch)]
    if not sweep:
        return None
    sweep.sort(key=lambda r: r["budget"])
    layers = sweep[0]["per_layer"]["layer"]
    budgets = []
    for i in range(len(layers)):
        fit = [r["budget"] for r in sweep if r["per_layer"]["mass_kept"][i] >= target]
        budgets.append(fit[0] if fit else sweep[-1]["budget"])
    return {"policy": policy, "batch": sweep[0]["batch"], "target_mass_per_layer": target, "layers": layers,
            "budgets": budgets, "total": sum(budgets), "mean": sum(budgets) / len(budgets),
            "swept_budgets": [r["budget"] for r in sweep]}


# -- tables ----------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


COLUMNS = (
    ("setting", "label", None), ("B", "batch", None), ("active", "active_experts_mean", ".1f"),
    ("p95", "active_experts_p95", ".0f"), ("topk active", "vanilla_active_experts_mean", ".1f"),
    ("reduction", "reduction", ".1%"), ("mass kept", "mass_kept", ".1%"), ("top-1 kept", "top1_kept", ".1%"),
    ("cap bound", "cap_bound", ".1%"),
    ("peak GPU", "peak_gpu_experts_mean", ".2f"), ("topk peak", "vanilla_peak_gpu_experts_mean", ".2f"),
    ("peak ratio", "peak_ratio", ".2f"), ("peak/mean", "peak_over_mean_gpu", ".2f"),
    ("tok max/mean", "tokens_per_gpu_max_over_mean", ".2f"), ("sel ms", "selector_ms_per_layer", ".2f"),
    ("MoE ms/step", "modelled_moe_ms_per_step", ".2f"), ("OTPS ratio", "otps_ratio", ".3f"),
)


def _cells(r: dict[str, Any]) -> list[str]:
    out = []
    for _, key, spec in COLUMNS:
        v = r.get(key)
        if key == "batch" and v is None:
            out.append("rec.")
        else:
            out.append(_fmt(v, spec) if spec else _fmt(v))
    return out


def text_table(rows: Sequence[dict[str, Any]]) -> str:
    head = [c[0] for c in COLUMNS]
    body = [_cells(r) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True)))]
    for b in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(b, widths, strict=True))))
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    head = [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cells(r)) + " |")
    return "\n".join(lines)


def matched_markdown(match: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> str:
    """One table per target: policies sorted by mass kept (best first), vanilla as reference."""
    parts = []
    for target in sorted({m["active_experts"] for m in match}):
        ms = [m for m in match if m["active_experts"] == target]
        ms.sort(key=lambda m: (m["mass_kept"] is None, -(m["mass_kept"] or 0.0)))
        lines = [f"At {target:g} activated experts per layer (interpolated on each policy's sweep):", "",
                 "| policy | B | mass kept | top-1 kept | sweep range (activated) |", "|---|---:|---:|---:|---:|"]
        for m in ms:
            rng = m["sweep_active_range"]
            name = m["policy"] + (" (target_mass)" if m.get("knob") == "target_mass" else "")
            lines.append(f"| {name} | {_fmt(m['batch'])} | {_fmt(m['mass_kept'], '.2%')} | "
                         f"{_fmt(m['top1_kept'], '.2%')} | {rng[0]:.1f}-{rng[1]:.1f} |")
        vans = {r["batch"]: r["vanilla_active_experts_mean"] for r in rows}
        for b, v in vans.items():
            lines.append(f"| topk (reference) | {_fmt(b)} | 100.00% | 100.00% | {v:.1f} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# -- placement comparison (--placement predictive) ------------------------------------------------------
PLACEMENT_COLUMNS = (
    ("policy", "policy", None), ("B", "batch", None), ("placement", "placement", None), ("R", "replica_slots", None),
    ("predictor", "predictor", None), ("N", "replan_every", None), ("planner", "planner", None),
    ("peak tok/GPU", "peak_gpu_tokens_mean", ".2f"), ("mean tok/GPU", "gpu_tokens_mean", ".2f"),
    ("tok max/mean", "tokens_per_gpu_max_over_mean", ".3f"), ("peak experts/GPU", "peak_gpu_experts_mean", ".2f"),
    ("mass kept", "mass_kept", ".1%"), ("MB moved/step", "moved_bytes_per_step", ".1f"),
    ("move ms/step", "move_ms_per_step", ".3f"), ("hot prec.", "hot_precision", ".2f"),
    ("hot recall", "hot_recall", ".2f"), ("load err.", "load_error", ".2f"),
    ("MoE ms/step", "modelled_moe_ms_per_step", ".3f"),
)


def _placement_cell(r: dict[str, Any], key: str, spec: str | None) -> str:
    v = r.get(key)
    if key in ("hot_precision", "hot_recall", "load_error"):
        v = (r.get("forecast") or {}).get(key)
    elif key == "moved_bytes_per_step" and v is not None:
        v = v / 1e6
    elif key == "batch" and v is None:
        return "rec."
    return _fmt(v, spec) if spec else _fmt(v)


def placement_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (setting, placement) of a placement comparison: per-GPU token load (the busiest GPU
    and the mean, token-expert assignments per step, mean over layers and steps), bytes moved, forecast."""
    head = [c[0] for c in PLACEMENT_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 7 + ["---:"] * (len(head) - 7)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_placement_cell(r, key, spec) for _, key, spec in PLACEMENT_COLUMNS) + " |")
    return "\n".join(lines)
