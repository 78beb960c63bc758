"""Result and placement types of the selection API."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# SGLang's _RENORMALIZE_SUM_EPSILON (topk.py): added to the routed-weight sum before renormalising.
RENORMALIZE_EPS = 1e-20

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class ModelShape:
    """What a config is checked against on a served model (:func:`xshare.selection.registry.validate`).

    num_experts  E: routed experts per MoE layer.
    top_k        experts each token is routed to.
    moe_layers   the model's MoE layer ids (decoder layer indices), in order; empty when unknown.
    """

    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...] = ()


def check_router_logits(router_logits: object) -> None:
    """ValueError naming ``router_logits`` unless it is a 2-D float tensor [T, E] with E >= 1."""
    if not isinstance(router_logits, Tensor):
        raise ValueError(f"router_logits must be a torch.Tensor, got {type(router_logits).__name__}")
    if router_logits.ndim != 2:
        raise ValueError(f"router_logits must be 2-D [T, E], got shape {tuple(router_logits.shape)}")
    if router_logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"router_logits must be a float tensor, got {router_logits.dtype}")
    if router_logits.shape[1] < 1:
        raise ValueError("router_logits has no experts (E = 0)")


@dataclass(frozen=True)
class Routing:
    """The routing of one MoE layer for one batch.

    topk_ids      int32 [T, top_k]: logical expert ids per token, most preferred first.
    topk_weights  float32 [T, top_k]: their gate weights (renormalised when the config says so).
    active        bool [E]: the union of routed ids over the batch's (non-padded) tokens.
    physical_ids  int32 [T, top_k] or None: the physical expert slot of each assignment, when a
                  placement with replicas was given (otherwise None: physical = logical).
    cap_bound     bool 0-d or None: the policy applied with a mass target and its budget stopped the
                  set before the target was reached (a device tensor, never read on the host here);
                  None when the policy has no mass target.
    """

    topk_ids: Tensor
    topk_weights: Tensor
    active: Tensor
    physical_ids: Tensor | None = None
    cap_bound: Tensor | None = None


@dataclass(frozen=True)
class Placement:
    """Where the experts of one MoE layer live: physical slots, their GPU, their logical expert.

    slot_gpu      int64 [P]: GPU (EP rank) of each physical slot.
    slot_expert   int64 [P]: logical expert held by each slot (every logical expert appears >= 1 time).
    num_gpus      G.
    replicas      int64 [E, R]: the physical slots of each logical expert, -1 padded (derived).
    replica_gpu   int64 [E, R]: their GPUs, -1 padded (derived).
    primary_gpu   int64 [E]: GPU of each expert's first replica (derived); GPU-aware caps charge it.

    Build with :meth:`contiguous`, :meth:`from_expert_gpu`, :meth:`from_physical` or
    :meth:`from_replica_gpus`; the derived tables are computed once here, never in the hot path.
    """

    slot_gpu: Tensor
    slot_expert: Tensor
    num_gpus: int
    replicas: Tensor
    replica_gpu: Tensor
    primary_gpu: Tensor

    @property
    def num_experts(self) -> int:
        """E: the logical experts (rows of ``replicas``)."""
        return int(self.replicas.shape[0])

    @property
    def num_slots(self) -> int:
        """P: the physical slots, E plus the redundant replicas."""
        return int(self.slot_gpu.shape[0])

    @property
    def has_replicas(self) -> bool:
        return self.num_slots > self.num_experts

    def to(self, device: torch.device | str) -> Placement:
        return Placement(*(getattr(self, n).to(device) if isinstance(getattr(self, n), Tensor) else getattr(self, n)
                           for n in ("slot_gpu", "slot_expert", "num_gpus", "replicas", "replica_gpu",
                                     "primary_gpu")))

    def padded(self, width: int) -> Placement:
        """The same placement with ``replicas`` and ``replica_gpu`` padded with -1 to ``width`` columns
        (>= their own). A table of fixed width keeps its shape when a rebalance changes how many replicas
        an expert has, so a device copy can be rewritten in place (``num_slots - num_experts + 1``
        columns hold any placement of those slots)."""
        have = self.replicas.shape[1]
        if width < have:
            raise ValueError(f"placement: width {width} is below the {have} replica columns it has")
        if width == have:
            return self
        pad = torch.full((self.num_experts, width - have), -1, dtype=self.replicas.dtype, device=self.replicas.device)
        return Placement(self.slot_gpu, self.slot_expert, self.num_gpus, torch.cat([self.replicas, pad], 1),
                         torch.cat([self.replica_gpu, pad], 1), self.primary_gpu)

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def build(cls, slot_gpu: Tensor, slot_expert: Tensor, num_experts: int, num_gpus: int | None = None) -> Placement:
        slot_gpu = torch.as_tensor(slot_gpu, dtype=torch.int64).flatten()
        slot_expert = torch.as_tensor(slot_expert, dtype=torch.int64).flatten()
        if slot_gpu.shape != slot_expert.shape:
            raise ValueError("placement: slot_gpu and slot_expert must have the same length")
        if slot_gpu.numel() == 0:
            raise ValueError("placement: no physical slots")
        if int(slot_gpu.min()) < 0:
            raise ValueError("placement: GPU ids must be >= 0")
        g = int(slot_gpu.max()) + 1 if num_gpus is None else int(num_gpus)
        if int(slot_gpu.max()) >= g:
            raise ValueError(f"placement: GPU id {int(slot_gpu.max())} >= num_gpus {g}")
        if int(slot_expert.min()) < 0 or int(slot_expert.max()) >= num_experts:
            raise ValueError(f"placement: logical expert ids must be in [0, {num_experts})")
        counts = torch.bincount(slot_expert, minlength=num_experts)
        if int(counts.min()) < 1:
            missing = int(torch.nonzero(counts == 0)[0])
            raise ValueError(f"placement: logical expert {missing} has no physical slot")
        r = int(counts.max())
        order = torch.argsort(slot_expert, stable=True)  # slots grouped by expert, in slot order
        sorted_expert = slot_expert[order]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel()) - starts[sorted_expert]
        replicas = torch.full((num_experts, r), -1, dtype=torch.int64)
        replicas[sorted_expert, rank] = order
        replica_gpu = torch.where(replicas >= 0, slot_gpu[replicas.clamp_min(0)], torch.full_like(replicas, -1))
        return cls(slot_gpu, slot_expert, g, replicas, replica_gpu, replica_gpu[:, 0].clone())

    @classmethod
    def contiguous(cls, num_experts: int, num_gpus: int) -> Placement:
        """Expert e on GPU e // ceil(E / G) (the layout of SGLang's trivial expert location)."""
        if num_gpus < 1 or num_experts < 1:
            raise ValueError("placement: num_experts and num_gpus must be >= 1")
        per = -(-num_experts // num_gpus)
        e = torch.arange(num_experts)
        return cls.build(e // per, e, num_experts, num_gpus)

    @classmethod
    def from_expert_gpu(cls, expert_gpu: Tensor, num_gpus: int | None = None) -> Placement:
        """One slot per expert; ``expert_gpu[e]`` is its GPU."""
        expert_gpu = torch.as_tensor(expert_gpu, dtype=torch.int64).flatten().cpu()
        e = expert_gpu.numel()
        return cls.build(expert_gpu, torch.arange(e), e, num_gpus)

    @classmethod
    def from_physical(cls, physical_to_logical: Tensor, num_gpus: int, num_experts: int | None = None) -> Placement:
        """SGLang's layout: physical slot p lives on GPU p // (P / G); ``physical_to_logical[p]``."""
        p2l = torch.as_tensor(physical_to_logical, dtype=torch.int64).flatten().cpu()
        p = p2l.numel()
        if num_gpus < 1 or p % num_gpus:
            raise ValueError(f"placement: {p} physical slots do not divide over {num_gpus} GPUs")
        e = int(p2l.max()) + 1 if num_experts is None else num_experts
        return cls.build(torch.arange(p) // (p // num_gpus), p2l, e, num_gpus)

    @classmethod
    def from_replica_gpus(cls, replica_gpu: Tensor, num_gpus: int | None = None) -> Placement:
        """A replica table: ``replica_gpu[e, j]`` is the GPU of expert e's j-th replica, -1 padded."""
        table = torch.as_tensor(replica_gpu, dtype=torch.int64).cpu()
        if table.ndim != 2:
            raise ValueError("placement: a replica table must be 2-D [E, R]")
        valid = table >= 0
        if not bool(valid[:, 0].all()):
            raise ValueError("placement: every expert needs a first replica (column 0 >= 0)")
        experts = torch.arange(table.shape[0]).unsqueeze(1).expand_as(table)
        return cls.build(table[valid], experts[valid], table.shape[0], num_gpus)


def as_placement(placement: Placement | Tensor | None, num_experts: int) -> Placement | None:
    """Normalise the ``placement`` argument of :func:`select` (validated; raises ValueError)."""
    if placement is None or isinstance(placement, Placement):
        if isinstance(placement, Placement) and placement.num_experts != num_experts:
            raise ValueError(f"placement covers {placement.num_experts} experts, router_logits has {num_experts}")
        return placement
    if not isinstance(placement, Tensor):
        raise ValueError(f"placement must be a Placement or an int tensor, got {type(placement).__name__}")
    if placement.dtype.is_floating_point or placement.dtype == torch.bool:
        raise ValueError(f"placement must be an integer tensor, got {placement.dtype}")
    if placement.ndim == 1:
        if placement.numel() != num_experts:
            raise ValueError(f"placement has length {placement.numel()}, expected E = {num_experts}")
        return Placement.from_expert_gpu(placement).to(placement.device)
    if placement.ndim == 2:
        if placement.shape[0] != num_experts:
            raise ValueError(f"placement replica table has {placement.shape[0]} rows, expected E = {num_experts}")
        return Placement.from_replica_gpus(placement).to(placement.device)
    raise ValueError(f"placement must be 1-D [E] or a 2-D replica table, got shape {tuple(placement.shape)}")
