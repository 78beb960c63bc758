"""Training of the tiny model on the synthetic tasks (CPU, float32, deterministic).

AdamW, loss on the answer and EOS tokens only, plus the router's load-balancing loss
(``router_aux_loss_coef``) so that every expert is used. The experts run through the sorted
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
from xshare.models.architecture import fork_rng
from xshare.models.config import TinyConfig, build_model
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


@dataclass
class TrainResult:
    model: Any
    tokenizer: Any
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean answer loss per logging window
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
                out = model(**batch, output_router_logits=True, use_cache=False)
                out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            aux = float(out.aux_loss.detach())
            window.append(float(out.loss.detach()) - cfg.router_aux_loss_coef * aux)
            aux_window.append(aux)
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                res.losses.append(sum(window) / len(window))
                res.aux_losses.append(sum(aux_window) / len(aux_window))
                window, aux_window = [], []
                if log is not None:
                    el = time.perf_counter() - t0
                    log(f"step {step + 1}/{cfg.steps}  loss {res.losses[-1]:.4f}  aux {res.aux_losses[-1]:.3f}  "
                        f"lr {_lr_at(cfg, step):.2e}  {el:.0f} s")
                if callback is not None:
                    model.eval()
                    with torch.random.fork_rng(devices=[]):
                        callback(step + 1, model)
                    model.train()
    res.seconds = time.perf_counter() - t0
    model.eval()
    return res
