"""The server's ``/metrics`` as numbers: parsing, settled snapshots, and per-setting figures from the
difference of two snapshots (activated experts per layer, peak GPU load, mass kept, MoE share)."""

from __future__ import annotations

import re
import time
from typing import Any

from xshare.bench.serve.client import Client

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


# The forward modes of the decode step: plain decode, and the verify forwards of speculative decoding
DECODE_MODES = ("decode", "target_verify")


def _mode_total(snapshot: dict, name: str, modes: tuple[str, ...] = DECODE_MODES) -> float:
    return sum(v for (n, lab), v in snapshot.items()
               if n == name and any(f'mode="{m}"' in lab.split(",") for m in modes))


def window_figures(before: dict, now: dict) -> dict[str, Any]:
    """Per-setting figures from two /metrics snapshots."""
    fwd_s, moe_s, fwd_n = (_mode_total(now, n) - _mode_total(before, n) for n in
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
        # XSHARE_PROFILE (the bench turns it on): host time of decode (or verify) forwards and of their MoE blocks
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


def merge_windows(windows: list[tuple[dict, dict]]) -> dict[str, Any]:
    """Pool several (before, after) snapshot pairs: sum the differences, then take means."""
    before: dict = {}
    after: dict = {}
    for b, a in windows:
        for k in set(a) | set(b):
            after[k] = after.get(k, 0.0) + a.get(k, 0.0) - b.get(k, 0.0)
    return window_figures(before, after)
