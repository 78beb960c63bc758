"""The report of ``xshare bench serve``: the table, the plots and the model's description."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xshare.bench._common import format_table


def _f(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    speculative = any(r.get("accept_length") is not None for r in rows)
    headers = ["setting", "experts/layer", "peak GPU", "fwd ms", "MoE %", "tok/s", "decode tok/s", "x off",
               "x off range", *(["accept", "x off"] if speculative else []), "exact", "d pts", *tasks]
    out = []
    for r in rows:
        layers = "/".join(_f(a) for a in r["activated_per_layer"]) if r.get("activated_per_layer") else "-"
        share = r.get("moe_share_decode")
        spread = r.get("decode_tokens_per_s_ratio_range")
        accept = [_f(r.get("accept_length"), ".2f"), _f(r.get("accept_length_ratio"), ".3f")] if speculative else []
        out.append([r["name"], layers, _f(r.get("peak_gpu_experts")), _f(r.get("decode_forward_ms")),
                    _f(None if share is None else 100 * share, ".0f"), _f(r.get("tokens_per_s")),
                    _f(r.get("decode_tokens_per_s")), _f(r.get("decode_tokens_per_s_ratio"), ".3f"),
                    "-" if not spread else f"{spread[0]:.2f}-{spread[1]:.2f}", *accept,
                    _f(100 * r["accuracy"]["overall"]), _f(r.get("accuracy_delta_points"), "+.1f"),
                    *[_f(100 * r["accuracy"].get(t, 0.0), ".0f") for t in tasks]])
    return format_table(headers, out)


def plot(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """accuracy_vs_experts.png and speed_vs_experts.png (one series per policy and knob: budgets, and the
    target masses as their own curve; off and topk as marks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("activated") is None:
            continue
        name = r["policy"] if r["enabled"] else "off"
        if r.get("target_mass") is not None:
            name += " (target mass)"
        series.setdefault(name, []).append(r)
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


def describe_model(model: Path) -> dict[str, Any]:
    from xshare.models.store import read_manifest

    man = read_manifest(model) or {}
    return {"dir": str(model), "identity": man.get("identity"), "config": man.get("config"),
            "heldout_offline": man.get("heldout")}
