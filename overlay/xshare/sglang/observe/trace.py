"""A bounded recorder of live routing traces, in the format of ``../shared/traces/README.md``.

Off by default (``XSHARE_TRACE_DIR`` turns it on). For every decode / target-verify forward that
the selector sees, it keeps each MoE layer's router logits (float16) and, when the forward ends,
appends the batch to the pending trace: ``seq_ids`` (one id per request, stable across forwards),
``positions``, ``batch_ids`` (one id per forward), ``topk_ids`` / ``topk_weights`` (the model's own
top-K and its softmax/sigmoid probabilities, not renormalised, as in the README) and
``router_logits`` [L, T, E]; for layers whose router is not a plain top-k (a correction bias, expert
groups, a recognised custom function) also the routing description (meta ``router``,
:meth:`~xshare.selection.routers.spec.RouterSpec.to_meta`) and the layers' biases (``correction_bias``
[L, E]), with ``topk_ids`` the model's own routing (bias and groups included). Every
``flush_tokens`` recorded tokens it writes a shard ``trace-r<rank>-p<pid>-<n>.npz`` (each shard a
complete trace file, written atomically); after ``max_tokens`` tokens it writes the rest and stops.
``xshare eval`` replays the shards batch by batch (with the routing description, when there is one).
Recording copies logits to the host (a synchronisation): it is a diagnostic, not for
latency-critical serving.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xshare.selection.routers.gate import reference_route, router_scores
from xshare.selection.routers.spec import RouterSpec

log = logging.getLogger("xshare.sglang")


@dataclass
class _Forward:
    batch_id: int
    seq_ids: np.ndarray | None  # int [T] or None (unknown)
    positions: np.ndarray | None
    layers: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> float16 [T, E]


class TraceRecorder:
    def __init__(self, out_dir: Path, *, max_tokens: int, flush_tokens: int, rank: int = 0,
                 meta: dict[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.max_tokens = int(max_tokens)
        self.flush_tokens = int(flush_tokens)
        self.rank = rank
        self.meta = dict(meta or {})
        self.top_k: int | None = None
        self.scoring = "softmax"
        self.recorded = 0  # tokens accepted so far
        self.shards_written: list[Path] = []
        self.stopped = False
        self._seq_index: dict[str, int] = {}
        self._current: _Forward | None = None
        self._pending: list[_Forward] = []
        self._pending_tokens = 0
        self._layer_ids: tuple[int, ...] | None = None
        self._next_batch = 0
        self._routers: dict[int, RouterSpec] = {}  # layer -> its routing description (router-spec layers)

    # -- called by the runtime ------------------------------------------------------------------
    def begin_forward(self, rids: list[str] | None, tokens_per_req: int, positions: Tensor | None) -> None:
        if self.stopped:
            return
        seq = None
        if rids is not None:
            ids = [self._seq_index.setdefault(r, len(self._seq_index)) for r in rids]
            seq = np.repeat(np.asarray(ids, dtype=np.int32), max(1, tokens_per_req))
        pos = None if positions is None else positions.detach().to("cpu", torch.int64).numpy().astype(np.int32)
        self._current = _Forward(batch_id=self._next_batch, seq_ids=seq, positions=pos)
        self._next_batch += 1

    def add_layer(self, layer_id: int, router_logits: Tensor, top_k: int, scoring: str,
                  router: RouterSpec | None = None) -> None:
        """One MoE layer's router logits; ``router``: the layer's routing description when it is not a
        plain softmax / sigmoid top-k (biased, grouped, custom), stored in the trace with it."""
        cur = self._current
        if self.stopped or cur is None:
            return
        self.top_k, self.scoring = top_k, scoring
        if router is not None and int(layer_id) not in self._routers:
            self._routers[int(layer_id)] = router
        cur.layers[int(layer_id)] = router_logits.detach().to("cpu", torch.float16).numpy()

    def end_forward(self) -> None:
        cur, self._current = self._current, None
        if self.stopped or cur is None or not cur.layers:
            return
        layer_ids = tuple(sorted(cur.layers))
        if self._layer_ids is None:
            self._layer_ids = layer_ids
        if layer_ids != self._layer_ids:
            return  # an incomplete forward (should not happen): not a consistent token set
        num_tokens = next(iter(cur.layers.values())).shape[0]
        if any(a.shape[0] != num_tokens for a in cur.layers.values()):
            return
        if cur.seq_ids is None or cur.seq_ids.shape[0] != num_tokens:
            base = 1_000_000 + cur.batch_id * 10_000  # unknown requests: one sequence per row
            cur.seq_ids = (base + np.arange(num_tokens)).astype(np.int32)
        if cur.positions is None or cur.positions.shape[0] != num_tokens:
            cur.positions = np.zeros(num_tokens, dtype=np.int32)
        room = self.max_tokens - self.recorded
        if num_tokens > room:
            self.stopped = True
            self.flush()
            return
        self._pending.append(cur)
        self._pending_tokens += num_tokens
        self.recorded += num_tokens
        if self._pending_tokens >= self.flush_tokens or self.recorded >= self.max_tokens:
            self.flush()
        if self.recorded >= self.max_tokens:
            self.stopped = True

    def _router_arrays(self, z: Tensor, ids: Tensor, w: Tensor) -> tuple[dict[str, Any], np.ndarray | None] | None:
        """For router-spec layers: the layers' routing description (meta ``router``, its bias as
        float32 [L, E]), and the model's own routing written into ``ids`` / ``w`` [L, T, K] in place:
        the experts its router picks (bias and groups included) with their affinities."""
        if not self._routers or self._layer_ids is None:
            return None
        specs = [self._routers.get(lid) for lid in self._layer_ids]
        first = next(s for s in specs if s is not None)
        if any(s is None or s.to_meta() != first.to_meta() for s in specs):
            self._warn_mixed_routers()
            return None
        for li, spec in enumerate(specs):
            gs = router_scores(z[li], spec, exact=False)
            own = reference_route(z[li], self.top_k, spec, exact=False, scores=gs).topk_ids[:, :self.top_k].long()
            aff = gs.affinity.gather(1, own).clamp(0.0, 1.0)
            order = torch.argsort(aff, dim=-1, descending=True, stable=True)
            ids[li] = own.gather(1, order)
            w[li] = aff.gather(1, order)
        bias = None
        if first.correction_bias is not None:
            bias = np.stack([s.correction_bias.detach().to("cpu", torch.float32).numpy() for s in specs])
        return first.to_meta(), bias

    def _warn_mixed_routers(self) -> None:
        if not getattr(self, "_mixed_warned", False):
            self._mixed_warned = True
            log.warning("xshare: the recorded layers have different router kinds; the trace stores no "
                        "routing description (replays treat them as plain top-k)")

    def flush(self) -> Path | None:
        """Write the pending forwards as one shard (atomic); returns its path, or None if empty."""
        if not self._pending or self._layer_ids is None or self.top_k is None:
            return None
        pending, self._pending, self._pending_tokens = self._pending, [], 0
        logits = np.concatenate([np.stack([f.layers[lid] for lid in self._layer_ids]) for f in pending], axis=1)
        z = torch.from_numpy(logits.astype(np.float32))
        probs = torch.softmax(z, dim=-1) if self.scoring == "softmax" else torch.sigmoid(z)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        router_arrays = self._router_arrays(z, ids, w)
        meta = {
            **self.meta,
            "num_experts": int(logits.shape[-1]),
            "top_k": int(self.top_k),
            "scoring": self.scoring if self.scoring in ("softmax", "sigmoid") else "softmax",
            "layers": [int(i) for i in self._layer_ids],
            "phase": "decode",
            "source": "xshare live recorder (SGLang plugin)",
            "rank": self.rank,
        }
        arrays = {
            "topk_ids": ids.numpy().astype(np.int16),
            "topk_weights": w.numpy().astype(np.float32),
            "seq_ids": np.concatenate([f.seq_ids for f in pending]).astype(np.int32),
            "positions": np.concatenate([f.positions for f in pending]).astype(np.int32),
            "batch_ids": np.concatenate([np.full(f.seq_ids.shape[0], f.batch_id, dtype=np.int32)
                                         for f in pending]),
            "router_logits": logits.astype(np.float16),
            "meta": np.asarray(json.dumps(meta)),
        }
        if router_arrays is not None:
            meta["router"], bias = router_arrays
            arrays["meta"] = np.asarray(json.dumps(meta))
            if bias is not None:
                arrays["correction_bias"] = bias
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"trace-r{self.rank}-p{os.getpid()}-{len(self.shards_written):04d}.npz"
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        self.shards_written.append(path)
        log.info("xshare: wrote trace shard %s (%d tokens)", path, arrays["seq_ids"].shape[0])
        return path
