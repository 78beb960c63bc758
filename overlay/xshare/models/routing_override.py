"""Batch-aware selection in place of the router, for offline evaluation (HF transformers).

:class:`RoutingOverride` replaces the router of every MoE layer by the selection core's decision
(:func:`xshare.selection.decide.decide`) over the batch's live rows (finished requests and left padding
are excluded) and records the activated experts per layer and the per-task expert usage. Two routers:
Qwen3-MoE's softmax top-k, and the GLM-4.5 / DeepSeek-V3 router of the aux-loss-free model (sigmoid,
correction bias, expert groups: the model's own gate routes, and the core gets the layer's
:class:`~xshare.selection.routers.spec.RouterSpec`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from xshare.models import tasks as T


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The sparse MoE blocks (router + experts) of a Qwen3-MoE or GLM-4.5 model, in layer order."""
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]


def router_spec(gate: torch.nn.Module) -> Any:
    """The :class:`~xshare.selection.routers.spec.RouterSpec` of a GLM-4.5 / DeepSeek-V3 router (transformers'
    ``Glm4MoeTopkRouter``: the routed scaling factor is in its weights), or None for a softmax router."""
    from xshare.models.architecture import CORRECTION_BIAS
    from xshare.selection.routers.spec import RouterSpec

    bias = getattr(gate, CORRECTION_BIAS, None)
    if not isinstance(bias, torch.Tensor):
        return None
    factor = float(gate.routed_scaling_factor)
    return RouterSpec(scoring="sigmoid", correction_bias=bias.detach().float(), num_expert_group=int(gate.num_group),
                      topk_group=int(gate.topk_group), renormalize=bool(gate.norm_topk_prob),
                      routed_scaling_factor=None if factor == 1.0 else factor, scaling_in_weights=factor != 1.0)


class RoutingOverride:
    """Replaces the router of every MoE layer by :func:`xshare.selection.select` over the live rows.

    The caller sets :attr:`valid` (bool, one per flattened row), :attr:`groups` (request id per
    row), :attr:`row_task` (task index per row) and :attr:`phase` before each forward. Rows not
    valid (left padding, finished requests) are routed as the model does and do not count. With
    ``selector=None`` the routing is the model's own and only statistics are recorded.
    """

    def __init__(self, model: torch.nn.Module, selector: Any = None, *, select_prefill: bool = False,
                 num_tasks: int = len(T.TASKS)) -> None:
        from xshare.selection import SelectorConfig

        if selector is not None and not isinstance(selector, SelectorConfig):
            raise ValueError(f"selector must be a SelectorConfig or None, got {type(selector).__name__}")
        self.model = model
        self.selector = selector
        self.select_prefill = select_prefill
        self.blocks = moe_blocks(model)
        if not self.blocks:
            raise ValueError("the model has no MoE layer (mlp.gate)")
        cfg = model.config
        self.num_experts = int(getattr(self.blocks[0].gate, "num_experts", None) or cfg.num_experts)
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.specs = [router_spec(block.gate) for block in self.blocks]
        self.valid: torch.Tensor | None = None
        self.groups: torch.Tensor | None = None
        self.row_task: torch.Tensor | None = None
        self.phase = "prefill"
        n_layers = len(self.blocks)
        # per phase: list over forwards of per-layer (activated, vanilla activated, rows)
        self.records: dict[str, list[list[tuple[int, int, int]]]] = {"prefill": [], "decode": []}
        self.usage = {ph: torch.zeros(n_layers, num_tasks, self.num_experts, dtype=torch.long)
                      for ph in ("prefill", "decode")}
        self._current: list[tuple[int, int, int]] | None = None

    def __enter__(self) -> RoutingOverride:
        for i, block in enumerate(self.blocks):
            gate = block.gate
            gate.forward = (lambda hs, _g=gate, _i=i: self._route(_g, _i, hs))
        return self

    def __exit__(self, *exc: object) -> None:
        for block in self.blocks:
            if "forward" in vars(block.gate):
                del block.gate.forward

    def begin_forward(self, phase: str, valid: torch.Tensor, groups: torch.Tensor, row_task: torch.Tensor) -> None:
        self.phase, self.valid, self.groups, self.row_task = phase, valid, groups, row_task
        self._current = [(0, 0, 0)] * len(self.blocks)
        self.records[phase].append(self._current)

    def _route(self, gate: torch.nn.Module, layer: int, hidden_states: torch.Tensor) -> tuple:
        from xshare.selection.decide import LayerCall, LayerRouting, decide

        hs = hidden_states.reshape(-1, gate.hidden_dim)
        spec = self.specs[layer]
        if spec is None:
            logits = F.linear(hs, gate.weight)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            top_v, top_i = torch.topk(probs, self.top_k, dim=-1)
            if self.norm_topk_prob:
                top_v = top_v / top_v.sum(dim=-1, keepdim=True)
            layer_routing: Any = LayerRouting("softmax", bool(self.norm_topk_prob))
        else:  # the model's own gate (bias, groups, scaling), as in training
            logits, top_v, top_i = type(gate).forward(gate, hs)
            layer_routing = spec
        valid = self.valid if self.valid is not None else torch.ones(hs.shape[0], dtype=torch.bool)
        if valid.shape[0] != hs.shape[0]:
            raise RuntimeError(f"routing override: {valid.shape[0]} row flags for {hs.shape[0]} rows")
        rows = valid.nonzero().squeeze(1)
        vanilla_active = int(torch.unique(top_i[rows]).numel())
        active = vanilla_active
        if self.selector is not None and rows.numel() and (self.phase == "decode" or self.select_prefill):
            groups = self.groups[rows] if self.groups is not None else None
            call = LayerCall(logits[rows].float(), self.top_k, layer_routing, groups=groups,
                             engine_ids=None if spec is None else top_i[rows])
            d = decide(call, self.selector)
            r = d.routing
            new_i, new_v = r.topk_ids.long(), r.topk_weights.to(top_v.dtype)
            if d.replaced is not None:  # a router-spec layer: only the rows the policy changed
                keep = ~d.replaced.unsqueeze(1)
                new_i = torch.where(keep, top_i[rows], new_i)
                new_v = torch.where(keep, top_v[rows], new_v)
            top_i = top_i.clone()
            top_v = top_v.clone()
            top_i[rows] = new_i
            top_v[rows] = new_v
            active = int(torch.unique(new_i).numel())
        if self._current is not None:
            self._current[layer] = (active, vanilla_active, int(rows.numel()))
        if self.row_task is not None and rows.numel():
            task = self.row_task[rows].unsqueeze(1).expand(-1, self.top_k)
            flat = task.reshape(-1) * self.num_experts + top_i[rows].reshape(-1)
            counts = torch.bincount(flat, minlength=self.usage[self.phase].shape[1] * self.num_experts)
            self.usage[self.phase][layer] += counts.view(-1, self.num_experts)
        return logits, top_v.to(logits.dtype), top_i

    def summary(self, phase: str = "decode") -> dict[str, Any]:
        """Mean activated experts per layer (and what vanilla top-k would activate on the same rows)."""
        recs = [r for r in self.records[phase] if r and r[0][2] > 0]
        if not recs:
            return {"forwards": 0}
        n_layers = len(self.blocks)
        act = [sum(r[i][0] for r in recs) / len(recs) for i in range(n_layers)]
        van = [sum(r[i][1] for r in recs) / len(recs) for i in range(n_layers)]
        rows = sum(r[0][2] for r in recs) / len(recs)
        return {"forwards": len(recs), "mean_rows": rows, "activated_per_layer": act,
                "activated": sum(act) / n_layers, "vanilla_per_layer": van, "vanilla": sum(van) / n_layers}
