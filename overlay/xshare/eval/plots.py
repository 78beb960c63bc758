"""PNG figures of an evaluation (matplotlib, Agg backend; no display needed).

    active_vs_batch.png  activated experts per layer vs batch size, topk and each policy (XShare Fig. 1)
    tradeoff.png         gate mass kept and top-1 kept vs activated experts per policy (the trade-off of Fig. 4)
    gpu_load.png         activated experts per GPU, topk vs xshare_ep (mean over layers and batches)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

PALETTE = ("tab:brown", "tab:pink", "tab:gray", "gold", "teal", "navy")  # policies without a colour of their own


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(policy: str) -> str:
    """The policy's own colour (``Policy.color``), else a stable one from the palette."""
    from xshare.selection import available_policies, get_policy

    try:
        own = get_policy(policy).color
    except ValueError:
        return "tab:gray"
    if own:
        return own
    return PALETTE[available_policies().index(policy) % len(PALETTE)]


def _x_batch(r: dict[str, Any]) -> float:
    return float(r["batch"] if r["batch"] is not None else r["batch_tokens_mean"])


def plot_active_vs_batch(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    vanilla = sorted({(_x_batch(r), r["vanilla_active_experts_mean"]) for r in rows})
    ax.plot([v[0] for v in vanilla], [v[1] for v in vanilla], "o-", color="black", label="topk (vanilla)", lw=2)
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["policy"] == "topk":
            continue
        key = r["label"]
        curves.setdefault(key, []).append((_x_batch(r), r["active_experts_mean"]))
    for key, pts in curves.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--", color=_color(key.split()[0]), label=key,
                alpha=0.85, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size B (tokens from B sequences)")
    ax.set_ylabel("activated experts per layer (mean)")
    ax.set_title(title or "Activated experts vs batch size")
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    plt = _plt()
    batches = sorted({r["batch"] for r in rows}, key=lambda b: (b is None, b or 0))
    fig, axes = plt.subplots(len(batches), 2, figsize=(11, 4.2 * len(batches)), squeeze=False)
    for i, b in enumerate(batches):
        rs = [r for r in rows if r["batch"] == b]
        for j, (key, name) in enumerate((("mass_kept", "gate mass kept"), ("top1_kept", "top-1 kept"))):
            ax = axes[i][j]
            by_policy: dict[str, list[tuple[float, float]]] = {}
            for r in rs:
                if r["policy"] != "topk":
                    by_policy.setdefault(r["policy"], []).append((r["active_experts_mean"], r[key]))
            for policy, pts in by_policy.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=_color(policy), label=policy, ms=4)
            if rs:
                ax.plot([rs[0]["vanilla_active_experts_mean"]], [1.0], "*", color="black", ms=12, label="topk")
            ax.set_xlabel("activated experts per layer (mean)")
            ax.set_ylabel(name)
            ax.set_title(f"{name} vs activated experts, B = {b if b is not None else 'recorded'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gpu_load(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> bool:
    """Bars per GPU: topk vs each xshare_ep setting (up to 4). False (nothing written) without xshare_ep."""
    ep = [r for r in rows if r["policy"] == "xshare_ep"][:4]
    if not ep:
        return False
    plt = _plt()
    import numpy as np

    g = len(ep[0]["vanilla_gpu_load_mean"])
    series = [("topk", ep[0]["vanilla_gpu_load_mean"], ep[0]["vanilla_peak_gpu_experts_mean"], "black")]
    palette = ["tab:orange", "tab:red", "tab:brown", "tab:pink"]
    for r, c in zip(ep, palette, strict=False):
        series.append((f"{r['label']} B={r['batch']}", r["gpu_load_mean"], r["peak_gpu_experts_mean"], c))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.6 * g + 3), 4.4))
    width = 0.8 / len(series)
    x = np.arange(g)
    for i, (name, load, peak, c) in enumerate(series):
        ax.bar(x + i * width - 0.4 + width / 2, load, width, color=c, alpha=0.8, label=f"{name} (mean peak {peak:.2f})")
        ax.axhline(peak, color=c, ls="--", lw=1)
    ax.set_xticks(x)
    ax.set_xlabel("GPU")
    ax.set_ylabel("activated experts on the GPU (mean over layers, batches)")
    ax.set_title(title or "Per-GPU load: topk vs xshare_ep (dashed: mean peak GPU load)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_plots(rows: Sequence[dict[str, Any]], folder: str, title: str = "") -> list[str]:
    """Write every figure into ``folder`` (created); returns the file names written."""
    os.makedirs(folder, exist_ok=True)
    written = []
    plot_active_vs_batch(rows, os.path.join(folder, "active_vs_batch.png"), title)
    written.append("active_vs_batch.png")
    plot_tradeoff(rows, os.path.join(folder, "tradeoff.png"), title)
    written.append("tradeoff.png")
    if plot_gpu_load(rows, os.path.join(folder, "gpu_load.png"), title):
        written.append("gpu_load.png")
    return written
