"""In-process counters of the selector, one :class:`SelectorStats` per scheduler process.

Host counters (calls, skips and fallbacks by reason) are plain ints. Per-layer sums that come from
device tensors (activated experts with and without the selector, tokens) accumulate in device
tensors, so the hot path never synchronises with the host; :meth:`SelectorStats.snapshot` reads them.
A later metrics exporter (Prometheus) or admin endpoint reads :meth:`snapshot`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class SelectorStats:
    """Counters of one process. Thread-safe for the host counters; device sums are updated in the
    forward thread only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0  # routing hook invocations (MoE layer calls seen)
        self.applied = 0  # calls where the policy ran and its result was used
        self.skipped: Counter[str] = Counter()  # reason -> calls routed by SGLang unchanged
        self.fallbacks: Counter[str] = Counter()  # reason -> calls where the selector failed (vanilla used)
        self.forwards = 0  # model forwards seen by the forward hook
        self.started = time.time()
        self._layers: dict[int, dict[str, Tensor]] = {}  # layer -> device sums

    # -- hot path ---------------------------------------------------------------------------
    def count_call(self) -> None:
        self.calls += 1

    def count_skip(self, reason: str) -> None:
        with self._lock:
            self.skipped[reason] += 1

    def count_fallback(self, reason: str) -> None:
        with self._lock:
            self.fallbacks[reason] += 1

    def count_forward(self) -> None:
        self.forwards += 1

    def record_layer(self, layer_id: int, active: Tensor, vanilla_active: Tensor, num_tokens: Tensor | int,
                     changed_tokens: Tensor | int = 0, checksum: Tensor | int = 0) -> None:
        """One applied call: ``active``/``vanilla_active`` bool [E] (selected / SGLang's own top-k);
        ``changed_tokens``: tokens whose expert set differs from SGLang's own top-k; ``checksum``: a
        position-weighted sum of the chosen ids (equal on every rank that made the same decisions)."""
        self.applied += 1
        sums = self._layers.get(layer_id)
        if sums is None or sums["activated"].device != active.device:
            z = torch.zeros((), dtype=torch.int64, device=active.device)
            sums = {"calls": z.clone(), "activated": z.clone(), "vanilla_activated": z.clone(), "tokens": z.clone(),
                    "changed_tokens": z.clone(), "checksum": z.clone()}
            self._layers[layer_id] = sums
        sums["calls"] += 1
        sums["activated"] += active.sum()
        sums["vanilla_activated"] += vanilla_active.sum()
        sums["tokens"] += torch.as_tensor(num_tokens, device=active.device).to(torch.int64)
        sums["changed_tokens"] += torch.as_tensor(changed_tokens, device=active.device).to(torch.int64)
        sums["checksum"] += torch.as_tensor(checksum, device=active.device).to(torch.int64)

    # -- reading ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of every counter (synchronises with the device)."""
        layers = {}
        for layer_id, sums in sorted(self._layers.items()):
            vals = {k: int(v.item()) for k, v in sums.items()}
            n = max(vals["calls"], 1)
            vals["mean_activated"] = vals["activated"] / n
            vals["mean_vanilla_activated"] = vals["vanilla_activated"] / n
            layers[str(layer_id)] = vals
        with self._lock:
            return {
                "pid": os.getpid(),
                "time": time.time(),
                "uptime_s": time.time() - self.started,
                "forwards": self.forwards,
                "calls": self.calls,
                "applied": self.applied,
                "skipped": dict(self.skipped),
                "fallbacks": dict(self.fallbacks),
                "fallbacks_total": sum(self.fallbacks.values()),
                "layers": layers,
            }


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
