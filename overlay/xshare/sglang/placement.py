"""Expert placements for GPU-aware policies and the per-GPU metrics: SGLang's expert-location
metadata (EP ranks, EPLB's redundant experts) when it has one, else a contiguous stand-in over the
EP size or over ``XSHARE_SIM_GPUS`` virtual GPUs. Built on the host and cached per layer; the hot
path only looks them up.

The copy of a layer's placement on the device is made once and kept: a call never copies it again
(a copy is a blocking host-to-device transfer eager, and an error under CUDA-graph capture). When
EPLB rebalances, the new placement is written into the same device tensors (``copy_``), so a graph
captured earlier reads the new one: :meth:`PlacementCache.refresh`, called by the hook on SGLang's
``ExpertLocationMetadata.update``, and any later lookup of a changed layer."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from xshare.selection import Placement


class PlacementCache:
    """Per-process placements: ``source(layer_id, E)`` (SGLang's, set by the hooks) or stand-ins."""

    def __init__(self, sim_gpus: Callable[[], int | None]) -> None:
        self.sim_gpus = sim_gpus
        self.source: Callable[[int, int], Placement | None] | None = None
        self.layers: dict[int, tuple[Tensor | None, Placement]] = {}  # SGLang's, by layer
        self._contiguous: dict[tuple[int, int], Placement] = {}  # stand-ins, by (E, GPUs)
        # (layer, E, device) -> (the host placement copied, its device copy): rewritten in place, never replaced
        # while the shapes allow (replica tables padded to a fixed width)
        self._device: dict[tuple[int, int, str], tuple[Placement, Placement]] = {}

    def contiguous(self, num_experts: int, num_gpus: int) -> Placement:
        key = (num_experts, num_gpus)
        placement = self._contiguous.get(key)
        if placement is None:
            placement = self._contiguous[key] = Placement.contiguous(*key)
        return placement

    def host(self, layer_id: int, num_experts: int) -> Placement:
        """The layer's placement on the host (SGLang's, or the contiguous stand-in)."""
        placement = self.source(layer_id, num_experts) if self.source else None
        if placement is None:
            placement = self.contiguous(num_experts, self.sim_gpus() or 1)
        return placement

    def for_layer(self, layer_id: int, num_experts: int, device: torch.device) -> Placement:
        """The layer's placement on ``device``: the kept copy, refreshed in place if the layer's placement
        changed since (no host-to-device copy otherwise)."""
        placement = self.host(layer_id, num_experts)
        if placement.slot_gpu.device == device:
            return placement
        return self._on_device(layer_id, placement, device)

    def _on_device(self, layer_id: int, placement: Placement, device: torch.device) -> Placement:
        key = (layer_id, placement.num_experts, str(device))
        held = self._device.get(key)
        if held is not None and held[0] is placement:
            return held[1]
        fixed = placement.padded(placement.num_slots - placement.num_experts + 1)
        copy = held[1] if held is not None else None
        if copy is not None and copy.num_gpus == fixed.num_gpus and all(
                getattr(copy, n).shape == getattr(fixed, n).shape for n in _TENSORS):
            for name in _TENSORS:  # in place: a captured graph keeps reading these tensors
                getattr(copy, name).copy_(getattr(fixed, name))
        else:
            copy = fixed.to(device)
        self._device[key] = (placement, copy)
        return copy

    def refresh(self, layer_ids: Iterable[int] | None = None) -> int:
        """Read again the placement of every layer kept on a device (only ``layer_ids`` if given) and
        write the changed ones into their device tensors in place. Host work, outside any capture: SGLang
        calls it when EPLB has rebalanced. Returns the number of device copies rewritten."""
        wanted = None if layer_ids is None else {int(i) for i in layer_ids}
        rewritten = 0
        for (layer_id, num_experts, device), (held, _) in list(self._device.items()):
            if wanted is not None and layer_id not in wanted:
                continue
            placement = self.host(layer_id, num_experts)
            if placement is not held:
                self._on_device(layer_id, placement, torch.device(device))
                rewritten += 1
        return rewritten


_TENSORS = ("slot_gpu", "slot_expert", "replicas", "replica_gpu", "primary_gpu")


def sglang_placement(cache: PlacementCache, layer_id: int, num_experts: int) -> Placement:
    """Placement of one layer from SGLang's ``ExpertLocationMetadata`` (physical slot p on EP rank
    p // num_local_physical_experts, redundant experts included), cached until EPLB changes it."""
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        meta = get_global_expert_location_metadata()
    except Exception:  # noqa: BLE001 - no expert-location metadata (no EP, unit tests): a contiguous placement
        meta = None
    layers = cache.layers
    sim_gpus = cache.sim_gpus()
    if meta is None or layer_id >= meta.num_layers or meta.num_logical_experts != num_experts or (
            sim_gpus and int(getattr(meta, "ep_size", 1) or 1) == 1):
        ep_size = _ep_size()
        gpus = ep_size if num_experts % ep_size == 0 else 1
        if gpus == 1 and sim_gpus:
            gpus = sim_gpus  # XSHARE_SIM_GPUS: a contiguous placement over N virtual GPUs
        cached = layers.get(layer_id)
        if cached is not None and cached[0] is None and cached[1].num_gpus == gpus:
            return cached[1]
        placement = Placement.contiguous(num_experts, gpus)
        layers[layer_id] = (None, placement)
        return placement
    phy2log = meta.physical_to_logical_map_cpu[layer_id]
    cached = layers.get(layer_id)
    if cached is not None and cached[0] is not None and torch.equal(cached[0], phy2log):
        return cached[1]
    placement = Placement.from_physical(phy2log.clone(), meta.ep_size)
    layers[layer_id] = (phy2log.clone(), placement)
    return placement


def _ep_size() -> int:
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(get_parallel().moe_ep_size or 1)
    except Exception:  # noqa: BLE001 - no parallel context: one EP rank
        return 1


def ep_position() -> tuple[int, int, bool]:
    """(EP size, this rank's EP rank, whether this rank is the first of the ranks sharing that EP rank):
    SGLang's MoE parallel layout (``moe_ep_*``; ``moe_tp_rank`` and ``moe_dp_rank`` 0 for the first).
    (1, 0, True) where SGLang has none (unit tests, a process without a parallel context)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        par = get_parallel()
        size, rank = int(par.moe_ep_size or 1), int(par.moe_ep_rank or 0)
        first = int(getattr(par, "moe_tp_rank", 0) or 0) == 0 and int(getattr(par, "moe_dp_rank", 0) or 0) == 0
        return size, rank, first
    except Exception:  # noqa: BLE001 - no parallel context: EP rank 0 of 1
        return 1, 0, True
