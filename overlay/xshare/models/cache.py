"""The trained models' cache: :func:`ensure_model` trains a model once into ``<cache>/tiny-moe-<config hash>``
(the Qwen3-MoE model) or ``<cache>/tiny-auxfree-<config hash>`` (the aux-loss-free GLM-4.5 model) and loads it
from there afterwards; :func:`check_reproducible` retrains and compares the hash.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xshare.models import tasks as T
from xshare.models.config import AuxFreeConfig, TinyConfig, config_from_dict
from xshare.models.evaluation import evaluate
from xshare.models.store import MANIFEST, model_intact, platform_info, read_manifest, save, state_sha256
from xshare.models.training import train

CACHE_ENV = "XSHARE_CACHE_DIR"
MODEL_DIR_ENV = "XSHARE_TINY_MODEL"
#: The aux-loss-free model's directory, if set (the counterpart of :data:`MODEL_DIR_ENV`).
AUXFREE_DIR_ENV = "XSHARE_TINY_AUXFREE_MODEL"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "xshare"


def default_model_dir(cfg: TinyConfig | None = None) -> Path:
    """``$XSHARE_TINY_MODEL`` if set, else ``<cache>/tiny-moe-<config hash>``; for an :class:`AuxFreeConfig`
    ``$XSHARE_TINY_AUXFREE_MODEL`` if set, else ``<cache>/tiny-auxfree-<config hash>``."""
    cfg = cfg or TinyConfig()
    env = os.environ.get(AUXFREE_DIR_ENV if isinstance(cfg, AuxFreeConfig) else MODEL_DIR_ENV)
    if env:
        return Path(env)
    return default_cache_dir() / f"{cfg.cache_prefix}-{cfg.identity()}"


def _lock(path: Path) -> Any:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "w")  # noqa: SIM115 - closed by the caller
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def ensure_model(model_dir: str | os.PathLike | None = None, cfg: TinyConfig | None = None, *,
                 log: Callable[[str], None] | None = print, eval_problems: int = 500) -> Path:
    """Return a directory holding the trained model for ``cfg``: load it if it is there and intact,
    else train it (≈ the time in docs/model.md), evaluate it on held-out problems and save it.

    ``model_dir`` defaults to :func:`default_model_dir` (``$XSHARE_TINY_MODEL`` or the cache). A
    directory that holds something else than a model of this config is replaced only if it holds
    a manifest (a model built here); otherwise a ``FileExistsError`` names it.
    """
    cfg = cfg or TinyConfig()
    d = Path(model_dir) if model_dir is not None else default_model_dir(cfg)
    if model_intact(d, cfg):
        return d
    lock = _lock(d.with_name(f".{d.name}.lock"))
    try:
        if model_intact(d, cfg):  # built by another process while we waited
            return d
        if d.exists() and any(d.iterdir()):
            try:
                man = read_manifest(d)
            except ValueError:
                man = None
            if man is None:
                raise FileExistsError(f"{d} is not empty and holds no tiny-model manifest; refusing to replace it")
        if log is not None:
            log(f"training the tiny {cfg.arch} model ({cfg.identity()}) into {d}")
        res = train(cfg, log=log)
        extra: dict[str, Any] = {}
        if eval_problems:
            ev = evaluate(res.model, res.tokenizer, T.heldout(eval_problems, seed=0, tasks=cfg.tasks))
            extra["heldout"] = {"problems": eval_problems, "seed": 0, "accuracy": ev["accuracy"]}
            if log is not None:
                log("held-out exact match: " + ", ".join(f"{k} {v:.3f}" for k, v in ev["accuracy"].items()))
        return save(res, cfg, d, extra=extra)
    finally:
        lock.close()


def check_reproducible(model_dir: str | os.PathLike, *, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Retrain from the manifest's config and compare the weights' hash with the manifest's."""
    man = read_manifest(model_dir)
    if man is None:
        raise FileNotFoundError(f"{model_dir}: no {MANIFEST}")
    cfg = config_from_dict(man["config"])
    res = train(cfg, log=log)
    got = state_sha256(res.model)
    same_platform = platform_info() == man.get("platform")
    return {"expected": man["state_sha256"], "got": got, "match": got == man["state_sha256"],
            "same_platform": same_platform, "seconds": round(res.seconds, 1)}
