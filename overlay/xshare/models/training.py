"""Training of the tiny models on the synthetic tasks (CPU, float32, deterministic).

AdamW, loss on the answer and EOS tokens only. The Qwen3-MoE model (:class:`TinyConfig`) adds the
router's load-balancing loss (``router_aux_loss_coef``) so that every expert is used; the aux-loss-free
model (:class:`~xshare.models.config.AuxFreeConfig`) has no auxiliary loss: after every optimiser step
each MoE layer's correction bias moves towards balance (:func:`update_correction_bias`, DeepSeek-V3's
rule), and the bias only chooses experts (the weights are the unbiased affinities). The experts run through the sorted
per-expert loop of :mod:`xshare.models.experts`; padding rows skip them. The same
:class:`~xshare.models.config.TinyConfig` on the same torch build, CPU instruction set and thread
count gives the same weights bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from xshare.models import tasks as T
from xshare.models.architecture import CORRECTION_BIAS, fork_rng
from xshare.models.config import AuxFreeConfig, TinyConfig, build_model
from xshare.models.experts import SORTED_EXPERTS, experts_implementation, skip_padding
from xshare.models.tokenizer import build_tokenizer, training_batch


def _lr_at(cfg: TinyConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def expert_load(topk_ids: torch.Tensor, num_experts: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert: ``topk_ids`` int [T, k], ``valid`` bool [T] (None: every row) -> int64 [E]."""
    ids = topk_ids if valid is None else topk_ids[valid]
    return torch.bincount(ids.reshape(-1).long(), minlength=num_experts)


def update_correction_bias(bias: torch.Tensor, load: torch.Tensor, speed: float) -> torch.Tensor:
    """DeepSeek-V3's aux-loss-free balancing step: ``bias_e + speed * sign(mean(load) - load_e)``.

    ``bias`` float32 [E], ``load`` [E] (tokens routed to each expert in the step) -> float32 [E]: an
    overloaded expert's bias falls, an underloaded one's rises, an expert at the mean keeps its bias."""
    load = load.to(torch.float32)
    return bias + speed * torch.sign(load.mean() - load)


def load_imbalance(load: torch.Tensor) -> float:
    """max(load) / mean(load) of a load vector [E] (1.0: perfectly balanced)."""
    mean = float(load.float().mean())
    return float(load.max()) / mean if mean > 0 else 0.0


class BiasBalancer:
    """The aux-loss-free balancing of every MoE layer of a GLM-4.5 / DeepSeek-V3-router model during training:
    forward hooks on the routers record each step's expert loads over the real tokens; :meth:`step`, after the
    optimiser's, moves each router's ``e_score_correction_bias`` (a buffer: never seen by the optimiser, no
    gradient) by :func:`update_correction_bias` and returns the step's mean :func:`load_imbalance`."""

    def __init__(self, model: torch.nn.Module, speed: float) -> None:
        self.speed = speed
        self.routers = [m for m in model.modules() if isinstance(getattr(m, CORRECTION_BIAS, None), torch.Tensor)]
        if not self.routers:
            raise ValueError("the model has no router with a correction bias")
        self.loads: list[torch.Tensor | None] = [None] * len(self.routers)
        self.valid: torch.Tensor | None = None
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
            if not module.training:
                return
            ids = out[2].detach()  # (router_logits, topk_weights, topk_indices)
            valid = self.valid if self.valid is not None and self.valid.shape[0] == ids.shape[0] else None
            self.loads[i] = expert_load(ids, module.num_experts, valid)
        return hook

    @torch.no_grad()
    def step(self) -> float:
        ratios = []
        for i, router in enumerate(self.routers):
            load = self.loads[i]
            if load is None:
                continue
            bias = getattr(router, CORRECTION_BIAS)
            bias.copy_(update_correction_bias(bias, load, self.speed))
            ratios.append(load_imbalance(load))
            self.loads[i] = None
        return sum(ratios) / len(ratios) if ratios else 0.0

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class TrainResult:
    model: Any
    tokenizer: Any
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean answer loss per logging window
    # Qwen3-MoE: the router's load-balancing loss; aux-loss-free: max/mean expert load (mean over MoE layers)
    aux_losses: list[float] = field(default_factory=list)


def train(cfg: TinyConfig, *, log: Callable[[str], None] | None = None, log_every: int = 100,
          callback: Callable[[int, Any], None] | None = None) -> TrainResult:
    """Train a model from scratch with ``cfg`` (deterministic); returns it in eval mode.

    ``callback(step, model)`` runs after every ``log_every`` steps (e.g. a held-out evaluation; it
    must leave the model's parameters and the global RNG alone)."""
    import itertools

    tokenizer = build_tokenizer()
    model = build_model(cfg)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, fused=True)
    stream = T.training_problems(cfg.seed, cfg.tasks, dict(cfg.task_weights))
    balancer = BiasBalancer(model, cfg.bias_update_speed) if isinstance(cfg, AuxFreeConfig) else None
    aux_name = "aux" if balancer is None else "max/mean load"
    res = TrainResult(model=model, tokenizer=tokenizer, seconds=0.0)
    window: list[float] = []
    aux_window: list[float] = []
    t0 = time.perf_counter()
    with _deterministic(cfg.threads), experts_implementation(model, SORTED_EXPERTS), fork_rng(cfg.seed):
        for step in range(cfg.steps):
            batch = training_batch(tokenizer, list(itertools.islice(stream, cfg.batch_size)))
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, step)
            with skip_padding(batch["attention_mask"]):
                if balancer is None:
                    out = model(**batch, output_router_logits=True, use_cache=False)
                else:
                    balancer.valid = batch["attention_mask"].reshape(-1).bool()
                    out = model(**batch, use_cache=False)  # the answer loss alone: no auxiliary term
                out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if balancer is None:
                aux = float(out.aux_loss.detach())
                window.append(float(out.loss.detach()) - cfg.router_aux_loss_coef * aux)
            else:
                aux = balancer.step()
                window.append(float(out.loss.detach()))
            aux_window.append(aux)
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                res.losses.append(sum(window) / len(window))
                res.aux_losses.append(sum(aux_window) / len(aux_window))
                window, aux_window = [], []
                if log is not None:
                    el = time.perf_counter() - t0
                    log(f"step {step + 1}/{cfg.steps}  loss {res.losses[-1]:.4f}  {aux_name} {res.aux_losses[-1]:.3f}  "
                        f"lr {_lr_at(cfg, step):.2e}  {el:.0f} s")
                if callback is not None:
                    model.eval()
                    with torch.random.fork_rng(devices=[]):
                        callback(step + 1, model)
                    model.train()
    res.seconds = time.perf_counter() - t0
    if balancer is not None:
        balancer.close()
    model.eval()
    return res
