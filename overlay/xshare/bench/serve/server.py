"""The model and the server of ``xshare bench serve`` (and ``xshare demo``): the trained tiny model, one
SGLang server with the plugin loaded, the selector off, the admin endpoint and /metrics on."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

SERVER_THREADS = 1


def resolve_model(model_dir: str | os.PathLike | None, log: Callable[[str], None] | None = print) -> Path:
    """The trained tiny model: ``model_dir`` as it is if it holds a model (config.json and weights),
    else built there with the default config; without ``model_dir`` the default cache
    (:func:`xshare.models.cache.ensure_model`: loaded if intact, else trained)."""
    from xshare.models.cache import ensure_model
    from xshare.models.store import WEIGHTS

    if model_dir is None:
        return ensure_model(log=log)
    d = Path(model_dir)
    if (d / "config.json").is_file() and (d / WEIGHTS).is_file():
        return d
    return ensure_model(d, log=log)


def start_server(model_dir: str | os.PathLike, *, token: str, sim_gpus: int, log_path: str | os.PathLike | None,
                 dtype: str = "float32", extra_env: dict[str, str] | None = None, port: int | None = None,
                 threads: int | None = SERVER_THREADS, sglang_args: tuple[str, ...] = (),
                 startup_timeout: float = 300.0) -> Any:
    """A real SGLang server with the plugin, selector off, admin endpoint and /metrics on (per-layer
    metrics: ``XSHARE_METRICS_DETAIL=layer``, which the per-layer figures read).

    ``threads``: OMP_NUM_THREADS of the server (None or 0: the environment's). One by default: on a
    small CPU the scheduler shares the cores with the tokenizer, the detokenizer, the HTTP server and
    the clients, and a second torch thread mostly waits for a core (twice the decode speed measured
    on 2 cores with one thread, selector off). ``sglang_args``: more arguments of the server (the
    speculative decoding options)."""
    from xshare.sglang.server import ServerProcess

    env = {"XSHARE_ADMIN_TOKEN": token, "XSHARE_SIM_GPUS": str(sim_gpus), "XSHARE_PROFILE": "1",
           "XSHARE_METRICS_DETAIL": "layer", **(extra_env or {})}
    if threads:  # torch threads of the server's processes (the scheduler runs the model)
        env.setdefault("OMP_NUM_THREADS", str(threads))
    srv = ServerProcess(model_dir, port, xshare_args=["--xshare-disable"],
                        sglang_args=["--enable-metrics", "--dtype", dtype, *sglang_args], env=env, log_path=log_path,
                        startup_timeout=startup_timeout)
    return srv.start()


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server-threads", type=int, default=SERVER_THREADS, metavar="N",
                   help=f"OMP_NUM_THREADS of the server (default {SERVER_THREADS}; 0 = the environment's)")
