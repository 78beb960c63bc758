"""Expert placements for a replay: contiguous, EPLB (from measured loads), or read from a file.

A placement file is JSON with ``physical_to_logical_map`` (SGLang's name; ``phy2log`` also works),
[P] for every layer or [L, P] with one row per trace layer, and optionally ``num_gpus``; or a
``.npy`` array of the same shape. Slot p lives on GPU p // (P / G), as in SGLang.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xshare.eval.eplb import rebalance_experts
from xshare.eval.traces import Trace, TraceError
from xshare.selection import Placement


@dataclass(frozen=True)
class EPLBOptions:
    redundant: int | None = None  # extra physical slots; None = one per GPU
    groups: int = 1
    nodes: int = 1
    mode: str = "auto"


def _balancedness(loads: np.ndarray, placements: Sequence[Placement]) -> float:
    """Expected token balancedness mean/max over GPUs (SGLang's definition), averaged over layers,
    with each expert's load split evenly over its replicas."""
    vals = []
    for w, p in zip(loads, placements, strict=True):
        se = p.slot_expert.numpy()
        per_slot = w[se] / np.bincount(se, minlength=w.size)[se]
        gpu = np.bincount(p.slot_gpu.numpy(), weights=per_slot, minlength=p.num_gpus)
        vals.append((gpu.mean() + 1e-5) / (gpu.max() + 1e-5))
    return float(np.mean(vals))


def read_placement_file(path: str, num_layers: int, num_experts: int, num_gpus: int) -> np.ndarray:
    """phy2log int64 [L, P] from a placement file (validated; errors name the file and key)."""
    if not os.path.exists(path):
        raise TraceError(path, "*", "placement file not found")
    key = "physical_to_logical_map"
    try:
        if path.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
            key = "<array>"
        else:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise TraceError(path, "*", "expected a JSON object")
            if key not in data and "phy2log" in data:
                key = "phy2log"
            if key not in data:
                raise TraceError(path, "physical_to_logical_map", "missing (or 'phy2log')")
            if "num_gpus" in data and data["num_gpus"] != num_gpus:
                raise TraceError(path, "num_gpus", f"= {data['num_gpus']} but --gpus {num_gpus}")
            arr = np.asarray(data[key])
    except (OSError, ValueError) as e:
        if isinstance(e, TraceError):
            raise
        raise TraceError(path, "*", f"not a readable placement ({e})") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise TraceError(path, key, f"must hold integer expert ids, got {arr.dtype}")
    if arr.ndim == 1:
        arr = np.broadcast_to(arr, (num_layers, arr.size))
    if arr.ndim != 2 or arr.shape[0] != num_layers:
        raise TraceError(path, key, f"expected [P] or [L={num_layers}, P], got shape {arr.shape}")
    if arr.size == 0 or arr.min() < 0 or arr.max() >= num_experts:
        raise TraceError(path, key, f"expert ids must be in [0, {num_experts})")
    if arr.shape[1] % num_gpus:
        raise TraceError(path, key, f"{arr.shape[1]} physical slots do not divide over --gpus {num_gpus}")
    for l in range(num_layers):
        if np.unique(arr[l]).size != num_experts:
            raise TraceError(path, key, f"layer {l} does not place every one of the {num_experts} experts")
    return arr.astype(np.int64)


def build_placements(kind: str, trace: Trace, layers: Sequence[int], num_gpus: int,
                     eplb: EPLBOptions | None = None,
                     calibration: Trace | None = None) -> tuple[list[Placement], dict[str, Any], np.ndarray | None]:
    """(one Placement per replayed layer, a description, phy2log [L, P] for every trace layer or None
    for contiguous). EPLB loads come from ``calibration`` when given, else from ``trace`` itself."""
    e = trace.num_experts
    if num_gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {num_gpus}")
    loads = trace.expert_loads(layers)
    info: dict[str, Any] = {"kind": kind, "num_gpus": num_gpus}
    if kind == "contiguous":
        if e % num_gpus:
            raise ValueError(f"--gpus {num_gpus} does not divide the {e} experts of {trace.paths[0]}")
        p = Placement.contiguous(e, num_gpus)
        placements = [p] * len(layers)
        info.update(num_physical=e, rule="expert e on GPU e // (E / G)")
        info["expected_token_balancedness"] = _balancedness(loads, placements)
        return placements, info, None
    if kind == "eplb":
        eplb = eplb or EPLBOptions()
        redundant = num_gpus if eplb.redundant is None else eplb.redundant
        if redundant < 0:
            raise ValueError(f"--eplb-redundant must be >= 0, got {redundant}")
        num_physical = e + redundant
        if num_physical % num_gpus:
            raise ValueError(f"--eplb-redundant {redundant}: {e} experts + {redundant} redundant = {num_physical} "
                             f"slots do not divide over --gpus {num_gpus}")
        source = calibration if calibration is not None else trace
        weight = source.expert_loads()  # every layer of the trace, so a saved placement covers them all
        phy2log, _, logcnt = rebalance_experts(weight, num_physical, eplb.groups, eplb.nodes, num_gpus, eplb.mode)
        placements = [Placement.from_physical(phy2log[l], num_gpus, num_experts=e) for l in layers]
        mode = eplb.mode if eplb.mode != "auto" else (
            "hierarchical" if eplb.groups % eplb.nodes == 0 else "global")
        info.update(num_physical=num_physical, redundant=redundant, groups=eplb.groups, nodes=eplb.nodes, mode=mode,
                    loads_from=list(source.paths), loads="tokens routed to each expert (recorded top-K) per layer",
                    max_replicas=int(logcnt.max()))
        info["expected_token_balancedness"] = _balancedness(loads, placements)
        info["contiguous_expected_token_balancedness"] = (
            _balancedness(loads, [Placement.contiguous(e, num_gpus)] * len(layers)) if e % num_gpus == 0 else None)
        return placements, info, phy2log
    # a file
    phy2log = read_placement_file(kind, trace.num_layers, e, num_gpus)
    placements = [Placement.from_physical(phy2log[l], num_gpus, num_experts=e) for l in layers]
    info.update(kind="file", path=kind, num_physical=int(phy2log.shape[1]))
    info["expected_token_balancedness"] = _balancedness(loads, placements)
    return placements, info, phy2log


def placement_json(phy2log: np.ndarray, num_gpus: int, layer_names: Sequence[Any], info: dict[str, Any]) -> str:
    """A placement file (readable by ``--placement FILE``): one row per trace layer."""
    return json.dumps({"physical_to_logical_map": phy2log.tolist(), "num_gpus": num_gpus,
                       "layers": list(layer_names), "info": info}) + "\n"
