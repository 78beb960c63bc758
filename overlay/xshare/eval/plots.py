"""PNG figures of an evaluation (matplotlib, Agg backend; no display needed).

    active_vs_batch.png  activated experts per layer vs batch size, topk and each policy (XShare Fig. 1)
    tradeoff.png         gate mass kept and top-1 kept vs activated experts per policy (the trade-off of Fig. 4)
    gpu_load.png         activated experts per GPU, topk vs xshare_ep (mean over layers and batches)
    peak_timeline.png    the busiest GPU's token load over the steps per placement (``--placement predictive``)
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


def _smooth(y: Sequence[float], window: int) -> Any:
    import numpy as np

    y = np.asarray(y, dtype=np.float64)
    if window <= 1 or y.size < window:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    return (c[window:] - c[:-window]) / window


def plot_peak_timeline(rows: Sequence[dict[str, Any]], path: str, title: str = "", window: int = 25) -> bool:
    """Peak per-GPU token load over the steps (moving mean of ``window`` steps, mean over layers), one panel
    per batch size and policy: no replicas, EPLB's static plan (each R), and per predictor its best
    predictive variant (lowest mean peak; every variant's mean is in the JSON and tables). False (nothing
    written) without timelines."""
    rows = [r for r in rows if r.get("timeline")]
    if not rows:
        return False
    plt = _plt()
    panels = sorted({(r["batch"], r["policy"]) for r in rows}, key=lambda k: (k[0] is None, k[0] or 0, k[1]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.4 * len(panels)), squeeze=False)
    for ax, (b, policy) in zip(axes[:, 0], panels, strict=True):
        rs = [r for r in rows if (r["batch"], r["policy"]) == (b, policy)]
        best: dict[str, dict[str, Any]] = {}
        for r in rs:
            if r["placement"] == "predictive" and (r["predictor"] not in best or r["peak_gpu_tokens_mean"]
                                                   < best[r["predictor"]]["peak_gpu_tokens_mean"]):
                best[r["predictor"]] = r
        shown = [r for r in rs if r["placement"] != "predictive"] + list(best.values())
        for i, r in enumerate(shown):
            color, ls = {"none": ("black", "-"), "eplb": ("tab:blue", "-")}.get(
                r["placement"], (PALETTE[i % len(PALETTE)], "--"))
            if r["placement"] == "eplb" and r["replica_slots"] > 1:
                ls = ":"
            y = _smooth(r["timeline"]["peak_gpu_tokens"], window)
            ax.plot(range(len(y)), y, ls, color=color, lw=1.3,
                    label=f"{r['label'].split(' @ ')[-1]} (mean {r['peak_gpu_tokens_mean']:.2f})")
        ax.set_xlabel("decode step")
        ax.set_ylabel(f"busiest GPU: token-expert\nassignments ({window}-step mean)")
        ax.set_title(f"{policy}, B = {b if b is not None else 'recorded'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    if plot_peak_timeline(rows, os.path.join(folder, "peak_timeline.png"), title):
        written.append("peak_timeline.png")
    return written
