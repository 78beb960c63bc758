"""Routing traces: load, validate, mix, and turn into router logits.

Format (``../shared/traces/README.md``), one ``.npz`` per trace:

    topk_ids       int [L, T, K]     the K experts each token was routed to, per layer
    topk_weights   float [L, T, K]   their gate probabilities (softmax over all experts, not renormalised)
    seq_ids        int [T]           the sequence (request) of each token
    positions      int [T]           position in its sequence (optional; default: order of appearance)
    batch_ids      int [T]           recorded forward batches (optional)
    router_logits  float16 [L, T, E] the full router logits (optional; written by the server's recorder)
    meta           0-d str (JSON)    needs ``num_experts`` and ``top_k``; ``scoring`` (softmax|sigmoid),
                                     ``layers``, ``model`` are used when present; ``router`` (optional):
                                     the layers' routing description when it is not a plain top-k
                                     (:meth:`xshare.selection.routers.spec.RouterSpec.to_meta`: correction
                                     bias, expert groups, routed scaling, custom function)
    correction_bias float [L, E]     the layers' correction biases (with a ``router`` that has one)

With a ``router`` (written by the server's recorder for biased / grouped routers) the replay routes
each layer as the server does for that router (:func:`xshare.selection.backends.reference_router.decide_router`), and
gate probabilities are the router's affinities.

Without ``router_logits`` only a token's stored top-K probabilities are known: their logits are the
log-probabilities (log-odds for sigmoid routers), and every other expert gets :data:`UNKNOWN_LOGIT`,
a finite logit whose gate probability is exactly 0 in float32 (softmax gives back the stored
probabilities renormalised over the top-K, so policies rank experts exactly as the model did).
Such an expert carries no gate mass and adds nothing to a batch's scores, but a token may still be
routed to it inside a policy's kept set S, as the server would route it to its best experts in S;
it then counts 0 in "gate mass kept" (the README's rule). Why not ``-inf``: ``select`` keeps
``top_k`` usable experts per token and widens to the token's own best ones when S holds too few,
so with exactly K usable experts every token would get its stored top-K back and every policy
would replay as ``topk``. A stored probability of 0 stays ``-inf`` (unusable).

Every problem raises :class:`TraceError` naming the file and the key.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xshare.selection.routers.gate import router_scores
from xshare.selection.routers.spec import RouterSpec

REQUIRED_KEYS = ("topk_ids", "topk_weights", "seq_ids", "meta")
# Logit of an expert outside a token's stored top-K: finite (usable), probability exactly 0 in float32
# under softmax (exp(-1e4) underflows) and under sigmoid.
UNKNOWN_LOGIT = -1.0e4
SCORINGS = ("softmax", "sigmoid")


class TraceError(ValueError):
    """A trace file is unusable; the message names the file and the key."""

    def __init__(self, path: str, key: str, message: str) -> None:
        self.path = path
        self.key = key
        super().__init__(f"{path}: key {key!r}: {message}")


@dataclass
class _Part:
    """One source file inside a (possibly mixed) trace: tokens [start, stop)."""

    path: str
    start: int
    stop: int
    router_logits: np.ndarray | None  # float16/32 [L, t, E] or None


@dataclass
class Trace:
    """One or several trace files mixed into one pool of tokens (sequence ids made disjoint)."""

    paths: tuple[str, ...]
    num_experts: int
    top_k: int
    scoring: str
    layer_names: list[Any]  # the model's layer numbers (meta 'layers'), or 0..L-1
    meta: list[dict[str, Any]]
    topk_ids: np.ndarray  # int64 [L, T, K], sorted by weight, highest first
    topk_weights: np.ndarray  # float32 [L, T, K]
    seq_ids: np.ndarray  # int64 [T], disjoint across files
    positions: np.ndarray  # int64 [T]
    batch_ids: np.ndarray | None  # int64 [T], disjoint across files, or None
    source: np.ndarray  # int64 [T]: index into paths
    parts: list[_Part] = field(default_factory=list)
    router: dict[str, Any] | None = None  # meta 'router' (RouterSpec.to_meta), or None: plain top-k
    correction_bias: np.ndarray | None = None  # float32 [L, E] with a router that has a bias

    def layer_router(self, layer: int) -> RouterSpec | None:
        """The layer's :class:`~xshare.selection.routers.spec.RouterSpec` (None: a plain top-k router)."""
        self._check_layer(layer)
        if self.router is None:
            return None
        bias = None if self.correction_bias is None else torch.from_numpy(self.correction_bias[layer])
        return RouterSpec.from_meta(self.router, bias)

    @property
    def num_layers(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def num_sequences(self) -> int:
        return int(np.unique(self.seq_ids).size)

    @property
    def model(self) -> str:
        names = sorted({str(m.get("model", "?")) for m in self.meta})
        return " + ".join(names)

    def describe(self) -> dict[str, Any]:
        return {
            "files": [
                {
                    "path": p.path,
                    "tokens": p.stop - p.start,
                    "sequences": int(np.unique(self.seq_ids[p.start:p.stop]).size),
                    "router_logits": p.router_logits is not None,
                    "task": m.get("task"),
                    "model": m.get("model"),
                }
                for p, m in zip(self.parts, self.meta, strict=True)
            ],
            "tokens": self.num_tokens,
            "sequences": self.num_sequences,
            "layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "scoring": self.scoring,
            "recorded_batches": self.batch_ids is not None,
        }

    # -- per-layer tensors ----------------------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")

    def layer_logits(self, layer: int) -> Tensor:
        """float32 [T, E] router logits of one layer (:data:`UNKNOWN_LOGIT` where nothing is stored)."""
        self._check_layer(layer)
        out = torch.full((self.num_tokens, self.num_experts), UNKNOWN_LOGIT, dtype=torch.float32)
        for part in self.parts:
            sl = slice(part.start, part.stop)
            if part.router_logits is not None:
                out[sl] = torch.from_numpy(np.asarray(part.router_logits[layer], dtype=np.float32))
                continue
            ids = torch.from_numpy(self.topk_ids[layer, sl])
            p = torch.from_numpy(self.topk_weights[layer, sl]).double()
            if self.scoring == "softmax":
                z = torch.log(p)  # log 0 = -inf: a stored probability of 0 is unusable
            else:  # sigmoid: the logit whose sigmoid is p
                z = torch.log(p) - torch.log1p(-p.clamp(max=1 - 1e-12))
            out[sl] = out[sl].scatter(1, ids, z.float())
        return out

    def layer_probs(self, layer: int) -> Tensor:
        """float32 [T, E]: the stored gate probability of every expert (0 where none is stored)."""
        self._check_layer(layer)
        out = torch.zeros((self.num_tokens, self.num_experts), dtype=torch.float32)
        for part in self.parts:
            sl = slice(part.start, part.stop)
            if part.router_logits is not None:
                z = torch.from_numpy(np.asarray(part.router_logits[layer], dtype=np.float32))
                spec = self.layer_router(layer)
                if spec is not None:
                    out[sl] = router_scores(z, spec, exact=False).affinity
                else:
                    out[sl] = torch.softmax(z, -1) if self.scoring == "softmax" else torch.sigmoid(z)
            else:
                ids = torch.from_numpy(self.topk_ids[layer, sl])
                out[sl] = out[sl].scatter(1, ids, torch.from_numpy(self.topk_weights[layer, sl]))
        return out

    def expert_loads(self, layers: Sequence[int] | None = None) -> np.ndarray:
        """float64 [L', E]: tokens routed to each expert (the recorded top-K), per layer."""
        layers = range(self.num_layers) if layers is None else layers
        return np.stack([
            np.bincount(self.topk_ids[l].ravel(), minlength=self.num_experts).astype(np.float64) for l in layers
        ])


# -- loading ------------------------------------------------------------------------------------
def _read_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise TraceError(path, "*", "file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise TraceError(path, "*", f"not a readable .npz trace ({e})") from None


def _parse_meta(path: str, raw: np.ndarray) -> dict[str, Any]:
    try:
        meta = json.loads(str(raw.item() if raw.ndim == 0 else raw))
    except (ValueError, TypeError) as e:
        raise TraceError(path, "meta", f"not a JSON string ({e})") from None
    if not isinstance(meta, dict):
        raise TraceError(path, "meta", "must be a JSON object")
    for key in ("num_experts", "top_k"):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise TraceError(path, "meta", f"needs an int {key!r} >= 1, got {v!r}")
    if meta["top_k"] > meta["num_experts"]:
        raise TraceError(path, "meta", f"top_k = {meta['top_k']} exceeds num_experts = {meta['num_experts']}")
    scoring = meta.get("scoring", "softmax")
    if scoring not in SCORINGS:
        raise TraceError(path, "meta", f"scoring must be one of {SCORINGS}, got {scoring!r}")
    meta["scoring"] = scoring
    return meta


def _int_array(path: str, key: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.integer):
        raise TraceError(path, key, f"must be an integer array, got dtype {a.dtype}")
    if a.shape != shape:
        raise TraceError(path, key, f"expected shape {shape}, got {a.shape}")
    return a.astype(np.int64)


def load_trace(path: str | os.PathLike, top_k: int | None = None) -> Trace:
    """Load and validate one trace file. ``top_k`` (the --top-k flag), when given, must agree."""
    path = os.fspath(path)
    data = _read_npz(path)
    for key in REQUIRED_KEYS:
        if key not in data:
            raise TraceError(path, key, "missing (required keys: " + ", ".join(REQUIRED_KEYS) + ")")
    meta = _parse_meta(path, data["meta"])
    num_experts, k = meta["num_experts"], meta["top_k"]
    if top_k is not None and top_k != k:
        raise TraceError(path, "meta", f"top_k = {k} in the trace but --top-k {top_k} was given")

    ids = data["topk_ids"]
    if ids.ndim != 3:
        raise TraceError(path, "topk_ids", f"expected 3 dims [L, T, K], got shape {ids.shape}")
    num_layers, num_tokens, kk = ids.shape
    if num_layers == 0:
        raise TraceError(path, "topk_ids", "the trace has no layers (L = 0)")
    if num_tokens == 0:
        raise TraceError(path, "topk_ids", "the trace is empty (T = 0 tokens)")
    if kk != k:
        raise TraceError(path, "topk_ids", f"holds K = {kk} experts per token but meta top_k = {k}")
    ids = _int_array(path, "topk_ids", ids, (num_layers, num_tokens, k))
    if ids.min() < 0 or ids.max() >= num_experts:
        raise TraceError(path, "topk_ids", f"expert ids must be in [0, {num_experts}), got [{ids.min()}, {ids.max()}]")
    srt = np.sort(ids, axis=-1)
    if k > 1 and bool((srt[..., 1:] == srt[..., :-1]).any()):
        raise TraceError(path, "topk_ids", "a token lists the same expert twice")

    w = data["topk_weights"]
    if not np.issubdtype(w.dtype, np.floating):
        raise TraceError(path, "topk_weights", f"must be a float array, got dtype {w.dtype}")
    if w.shape != ids.shape:
        raise TraceError(path, "topk_weights", f"shape {w.shape} differs from topk_ids {ids.shape}")
    w = w.astype(np.float32)
    if not bool(np.isfinite(w).all()) or w.min() < 0 or w.max() > 1 + 1e-4:
        raise TraceError(path, "topk_weights", "gate probabilities must be finite and in [0, 1]")
    # Highest weight first (the README's order; the top-1 metric reads column 0).
    order = np.argsort(-w, axis=-1, kind="stable")
    ids = np.take_along_axis(ids, order, -1)
    w = np.take_along_axis(w, order, -1)

    seq_ids = _int_array(path, "seq_ids", data["seq_ids"], (num_tokens,))
    if "positions" in data:
        positions = _int_array(path, "positions", data["positions"], (num_tokens,))
    else:  # order of appearance within each sequence
        positions = np.zeros(num_tokens, dtype=np.int64)
        _, inv = np.unique(seq_ids, return_inverse=True)
        seen: dict[int, int] = {}
        for t, s in enumerate(inv.tolist()):
            positions[t] = seen.get(s, 0)
            seen[s] = positions[t] + 1
    batch_ids = None
    if "batch_ids" in data:
        batch_ids = _int_array(path, "batch_ids", data["batch_ids"], (num_tokens,))

    logits = None
    if "router_logits" in data:
        logits = data["router_logits"]
        if not np.issubdtype(logits.dtype, np.floating):
            raise TraceError(path, "router_logits", f"must be a float array, got dtype {logits.dtype}")
        if logits.shape != (num_layers, num_tokens, num_experts):
            raise TraceError(path, "router_logits",
                             f"expected shape [L, T, E] = {(num_layers, num_tokens, num_experts)}, got {logits.shape}")
        if bool(np.isnan(logits).any()) or bool(np.isposinf(logits).any()):
            raise TraceError(path, "router_logits", "contains NaN or +inf")

    layer_names = meta.get("layers")
    if not isinstance(layer_names, list) or len(layer_names) != num_layers:
        layer_names = list(range(num_layers))
    router, bias = _router(path, meta, data, num_layers, num_experts, k)
    part = _Part(path=path, start=0, stop=num_tokens, router_logits=logits)
    return Trace(
        paths=(path,), num_experts=num_experts, top_k=k, scoring=meta["scoring"], layer_names=layer_names,
        meta=[meta], topk_ids=ids, topk_weights=w, seq_ids=seq_ids, positions=positions, batch_ids=batch_ids,
        source=np.zeros(num_tokens, dtype=np.int64), parts=[part], router=router, correction_bias=bias,
    )


def _router(path: str, meta: dict[str, Any], data: dict[str, np.ndarray], num_layers: int, num_experts: int,
            top_k: int) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """meta 'router' and the 'correction_bias' array, checked by building every layer's spec."""
    router = meta.get("router")
    if router is None:
        if "correction_bias" in data:
            raise TraceError(path, "correction_bias", "present without a 'router' in meta")
        return None, None
    bias = None
    if "correction_bias" in data:
        bias = data["correction_bias"]
        if not np.issubdtype(bias.dtype, np.floating) or bias.shape != (num_layers, num_experts):
            raise TraceError(path, "correction_bias",
                             f"expected a float array [L, E] = {(num_layers, num_experts)}, got {bias.dtype} "
                             f"{bias.shape}")
        bias = bias.astype(np.float32)
    for layer in range(num_layers):
        try:
            spec = RouterSpec.from_meta(router, None if bias is None else torch.from_numpy(bias[layer]))
            spec.check(num_experts, top_k)
        except ValueError as exc:
            raise TraceError(path, "meta", f"router: {exc}") from None
    return router, bias


def _dense(a: np.ndarray) -> np.ndarray:
    return np.unique(a, return_inverse=True)[1].astype(np.int64).reshape(a.shape)


def mix_traces(traces: Sequence[Trace]) -> Trace:
    """Pool the tokens of several traces (same model shape) into one; ids made disjoint per file."""
    if not traces:
        raise ValueError("no trace given")
    first = traces[0]
    for tr in traces[1:]:
        path = tr.paths[0]
        for key, a, b in (("num_experts", tr.num_experts, first.num_experts), ("top_k", tr.top_k, first.top_k),
                          ("scoring", tr.scoring, first.scoring)):
            if a != b:
                raise TraceError(path, "meta", f"{key} = {a!r} differs from {first.paths[0]} ({b!r})")
        if tr.num_layers != first.num_layers:
            raise TraceError(path, "topk_ids",
                             f"has {tr.num_layers} layers, {first.paths[0]} has {first.num_layers}")
        if tr.router != first.router or (tr.correction_bias is None) != (first.correction_bias is None) or (
                tr.correction_bias is not None and not np.array_equal(tr.correction_bias, first.correction_bias)):
            raise TraceError(path, "meta", f"its router differs from {first.paths[0]}'s: traces of different "
                                           "routers cannot be mixed")
        if (tr.batch_ids is None) != (first.batch_ids is None):
            has, lacks = (path, first.paths[0]) if tr.batch_ids is not None else (first.paths[0], path)
            raise TraceError(path, "batch_ids", f"present in {has} but not in {lacks}: recorded and unrecorded "
                                                "batches cannot be mixed")
    if len(traces) == 1:
        tr = traces[0]
        tr.seq_ids = _dense(tr.seq_ids)
        if tr.batch_ids is not None:
            tr.batch_ids = _dense(tr.batch_ids)
        return tr
    seq, bat, parts, src = [], [], [], []
    seq_off = bat_off = tok_off = 0
    for i, tr in enumerate(traces):
        s = _dense(tr.seq_ids)
        seq.append(s + seq_off)
        seq_off += int(s.max()) + 1
        if tr.batch_ids is not None:
            b = _dense(tr.batch_ids)
            bat.append(b + bat_off)
            bat_off += int(b.max()) + 1
        for p in tr.parts:
            parts.append(_Part(p.path, p.start + tok_off, p.stop + tok_off, p.router_logits))
        src.append(np.full(tr.num_tokens, i, dtype=np.int64))
        tok_off += tr.num_tokens
    return Trace(
        paths=tuple(p for tr in traces for p in tr.paths), num_experts=first.num_experts, top_k=first.top_k,
        scoring=first.scoring, layer_names=first.layer_names, meta=[m for tr in traces for m in tr.meta],
        topk_ids=np.concatenate([tr.topk_ids for tr in traces], axis=1),
        topk_weights=np.concatenate([tr.topk_weights for tr in traces], axis=1),
        seq_ids=np.concatenate(seq), positions=np.concatenate([tr.positions for tr in traces]),
        batch_ids=np.concatenate(bat) if bat else None, source=np.concatenate(src), parts=parts,
        router=first.router, correction_bias=first.correction_bias,
    )


def load_traces(paths: Sequence[str | os.PathLike], top_k: int | None = None) -> Trace:
    """Load every file (each validated) and mix them."""
    if not paths:
        raise ValueError("--trace: at least one trace file is required")
    return mix_traces([load_trace(p, top_k=top_k) for p in paths])


def parse_layers(spec: str | None, num_layers: int, path: str = "--layers") -> list[int]:
    """'0,2,5-7' (indices into the trace's layer axis) -> sorted unique list; None -> all layers."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(num_layers))
    out: set[int] = set()
    for chunk in spec.split(","):
        chunk = chunk.strip()
        try:
            if "-" in chunk:
                a, b = (int(x) for x in chunk.split("-", 1))
                rng = range(a, b + 1)
            else:
                rng = range(int(chunk), int(chunk) + 1)
        except ValueError:
            raise ValueError(f"{path}: cannot parse {chunk!r} (expected e.g. 0,2,5-7)") from None
        for i in rng:
            if not 0 <= i < num_layers:
                raise ValueError(f"{path}: layer index {i} out of range [0, {num_layers}) of the trace")
            out.add(i)
    if not out:
        raise ValueError(f"{path}: no layer selected")
    return sorted(out)

