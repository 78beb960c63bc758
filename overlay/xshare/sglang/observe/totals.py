"""Host totals of the selector's device figures: what the snapshots (:mod:`xshare.sglang.observe.snapshot`)
of :class:`~xshare.sglang.observe.stats.SelectorStats` brought, added up. Pure host code on host tensors.

* layer sums: one list per (MoE layer, forward mode), in the columns of the sums pages;
* request sums: per forward mode, requests seen, experts summed over them, the most experts one
  request used (a maximum, not a sum), requests over the per-request budget;
* the mass-cap-bound and short-row counts;
* the metrics window: the rows written since the last snapshot, cut out of the ring's copy with the
  copy of its index, kept until the metrics flush drains them (at most one ring's worth: older rows are
  dropped and counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["HostTotals"]


class HostTotals:
    """The figures that have reached the host (see the module docstring)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[int, str], list[int]] = {}  # (layer, mode) -> the sums row, summed
        self.requests: dict[str, list[int]] = {}  # mode -> [requests, experts summed, max experts, over budget]
        self.cap_bound = 0
        self.short_rows = 0
        self.rows: list[Tensor] = []  # window rows not drained yet, oldest first (float32 [n, F] each)
        self.pending = 0  # rows held in ``rows``
        self.dropped = 0  # window rows dropped (more than a ring's worth between two drains)

    def add_snapshot(self, kinds: Sequence[tuple[str, Any]], host: Sequence[Tensor], ring: Tensor | None,
                     read: int) -> int:
        """One arrived snapshot: ``host[i]`` is the copy of a buffer of kind ``kinds[i][0]`` (``sums`` of
        a page, whose ``layers`` name its rows; ``requests`` of a mode; ``cap_bound``; ``short_rows``;
        ``window``, the ring copied, and ``window_idx``, its index). ``ring``: the ring in use now, whose
        rows ``read`` onwards are new (a ring remade since the snapshot, of another width, starts afresh
        and the copy's rows go). Returns the rows of ``ring`` read so far."""
        copied = written = None
        for (kind, of), h in zip(kinds, host, strict=True):
            if kind == "sums":
                self.add_sums(of.layers, h)
            elif kind == "requests":
                self.add_requests(of, h)
            elif kind == "cap_bound":
                self.cap_bound += int(h)
            elif kind == "short_rows":
                self.short_rows += int(h)
            elif kind == "window":
                copied = h if of is ring else None
            elif kind == "window_idx":
                written = int(h)
        if copied is None or written is None:
            return read
        self.add_window(copied, written, read)
        return written

    def add_sums(self, layers: Sequence[tuple[int, str]], host: Tensor) -> None:
        """One page's copy (int64 [rows, columns]): row i holds what ``layers[i]`` added since the last."""
        for key, values in zip(layers, host.tolist()[:len(layers)], strict=True):
            total = self.sums.setdefault(key, [0] * len(values))
            for i, v in enumerate(values):
                total[i] += v

    def add_requests(self, mode: str, host: Tensor) -> None:
        """One request-sums copy (int64 [4]) of ``mode``: its third value is a maximum."""
        seen, experts, most, over = (int(v) for v in host.tolist())
        total = self.requests.setdefault(mode, [0, 0, 0, 0])
        total[0] += seen
        total[1] += experts
        total[2] = max(total[2], most)
        total[3] += over

    def add_window(self, ring: Tensor, written: int, read: int) -> None:
        """The rows ``[read, written)`` of a ring copy (float32 [capacity, F]; row n at n mod capacity)."""
        capacity = ring.shape[0]
        if self.rows and self.rows[0].shape[1] != ring.shape[1]:  # a ring of another width: its rows go
            self.dropped += self.pending
            self.rows, self.pending = [], 0
        if written - read > capacity:
            self.dropped += written - read - capacity
            read = written - capacity
        if written > read:
            self.rows.append(ring.index_select(0, torch.arange(read, written) % capacity))
            self.pending += written - read
        excess = self.pending - capacity
        while excess > 0:  # a ring's worth is kept: the oldest rows go first
            first = self.rows[0]
            cut = min(excess, first.shape[0])
            self.rows[0] = first[cut:]
            if not self.rows[0].shape[0]:
                self.rows.pop(0)
            self.pending -= cut
            self.dropped += cut
            excess -= cut

    def take_rows(self, width: int) -> Tensor:
        """The window rows held, oldest first (float32 [n, F]; [0, width] when none), and none kept."""
        if not self.rows:
            return torch.zeros(0, width)
        out = torch.cat(self.rows) if len(self.rows) > 1 else self.rows[0]
        self.rows, self.pending = [], 0
        return out

    def per_layer(self, columns: Sequence[str]) -> dict[int, dict[str, int]]:
        """layer -> column -> total, summed over forward modes."""
        out: dict[int, dict[str, int]] = {}
        for (layer, _mode), total in self.sums.items():
            row = out.setdefault(layer, dict.fromkeys(columns, 0))
            for name, v in zip(columns, total, strict=True):
                row[name] += v
        return out

    def modes(self) -> set[str]:
        return {m for _, m in self.sums} | set(self.requests)

    def mode_figures(self, mode: str, columns: Sequence[str], budgeted: bool) -> dict[str, Any]:
        """One forward mode's applied calls, activated experts (with and without the selector), tokens, their
        means per applied call, per-layer means (``layers``) and, where requests were counted, ``requests``
        (``over_group_budget`` too when ``budgeted``: a policy with a per-request budget ran in it)."""
        layers: dict[str, dict[str, float]] = {}
        sums = dict.fromkeys(("applied", "activated", "vanilla_activated", "tokens"), 0)
        for (layer, m), total in sorted(self.sums.items()):
            if m != mode:
                continue
            v = dict(zip(columns, total, strict=True))
            n = max(v["calls"], 1)
            layers[str(layer)] = {"calls": v["calls"], "activated": v["activated"],
                                  "vanilla_activated": v["vanilla_activated"], "mean_activated": v["activated"] / n,
                                  "mean_vanilla_activated": v["vanilla_activated"] / n}
            sums["applied"] += v["calls"]
            for name in ("activated", "vanilla_activated", "tokens"):
                sums[name] += v[name]
        n = max(sums["applied"], 1)
        entry: dict[str, Any] = {**sums, "mean_activated": sums["activated"] / n,
                                 "mean_vanilla_activated": sums["vanilla_activated"] / n, "layers": layers}
        req = self.requests.get(mode)
        if req is not None:
            entry["requests"] = {"request_calls": req[0], "mean_experts": req[1] / max(req[0], 1),
                                 "max_experts": req[2]}
            if budgeted:
                entry["requests"]["over_group_budget"] = req[3]
        return entry
