"""What ``xshare launch`` starts and how it supervises it: :class:`LaunchConfig`, its checks, and what follows from
it alone -- each node's command line (:meth:`LaunchConfig.argv`), the placement group's bundles and the backoff
between restarts. Pure Python: nothing here talks to Ray or starts a process.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

#: Flags the launcher sets itself; passing them in the server arguments is an error.
RESERVED_SERVER_FLAGS = (
    "--nnodes",
    "--node-rank",
    "--dist-init-addr",
    "--nccl-init-addr",
    "--host",
    "--port",
)
#: ``{python}`` in a command is replaced by the agent's interpreter on its node.
DEFAULT_SERVER_CMD = "{python} -m xshare.cli serve"
STANDIN_SERVER_CMD = "{python} -m xshare.deploy.standin"


class LaunchError(RuntimeError):
    """The launch cannot proceed (bad configuration, infeasible placement, no Ray cluster)."""


@dataclass
class LaunchConfig:
    """What to launch and how to supervise it. See ``xshare launch --help`` for each field."""

    server_args: list[str] = field(default_factory=list)
    server_cmd: str = DEFAULT_SERVER_CMD
    nnodes: int = 1
    gpus_per_node: float = 0
    cpus_per_node: float = 1
    resources_per_node: dict[str, float] = field(default_factory=dict)
    host: str = "0.0.0.0"
    port: int = 30000
    dist_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    startup_timeout: float = 1800.0
    health_interval: float = 2.0
    max_health_failures: int = 0
    poll_interval: float = 0.5
    max_restarts: int = 3
    backoff_initial: float = 5.0
    backoff_factor: float = 2.0
    backoff_max: float = 60.0
    stop_grace: float = 30.0
    pg_timeout: float = 300.0
    rank0_on_head: bool = False
    worker_port: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be >= 1, got {self.nnodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.cpus_per_node <= 0:
            raise ValueError(f"cpus_per_node must be > 0, got {self.cpus_per_node}")
        for name in ("port", "dist_port", "worker_port"):
            v = getattr(self, name)
            if not 0 <= v <= 65535 or (name == "port" and v == 0):
                hint = "" if name == "port" else ", or 0 for a free one"
                raise ValueError(f"{name} must be a TCP port (1..65535{hint}), got {v}")
        for name in ("max_restarts", "max_health_failures"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("startup_timeout", "health_interval", "poll_interval", "pg_timeout", "backoff_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("backoff_initial", "backoff_max", "stop_grace"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.health_path.startswith("/"):
            raise ValueError(f"health_path must start with '/', got {self.health_path!r}")
        if not shlex.split(self.server_cmd):
            raise ValueError("server_cmd is empty")
        for a in self.server_args:
            flag = a.split("=", 1)[0]
            if flag in RESERVED_SERVER_FLAGS:
                raise ValueError(
                    f"server argument {flag} is set by the launcher (use --nnodes/--host/--port/--dist-port of "
                    "xshare launch instead)"
                )
        for k in self.env:
            if not k or "=" in k:
                raise ValueError(f"bad environment variable name {k!r}")

    def backoff(self, restart: int) -> float:
        """Seconds to wait before restart number ``restart`` (1-based)."""
        return min(self.backoff_initial * self.backoff_factor ** max(restart - 1, 0), self.backoff_max)

    def bundles(self) -> list[dict[str, float]]:
        """The placement group's bundles: one per node."""
        b: dict[str, float] = {"CPU": float(self.cpus_per_node)}
        if self.gpus_per_node:
            b["GPU"] = float(self.gpus_per_node)
        b.update({k: float(v) for k, v in self.resources_per_node.items()})
        out = [dict(b) for _ in range(self.nnodes)]
        if self.rank0_on_head:
            out[0]["node:__internal_head__"] = 0.001
        return out

    def argv(self, rank: int, dist_init_addr: str | None, python: str = sys.executable,
             node_port: int | None = None) -> list[str]:
        """The command line of node ``rank``. Rank 0 serves HTTP on ``host:port``; SGLang's other ranks run only a
        small health server on their ``--port`` (default 30000), so ``node_port`` gives them one of their own
        (needed when several "nodes" share a machine, as in tests)."""
        cmd = [python if tok == "{python}" else tok.replace("{python}", python) for tok in shlex.split(self.server_cmd)]
        out = cmd + list(self.server_args)
        if self.nnodes > 1:
            if not dist_init_addr:
                raise ValueError("dist_init_addr is required when nnodes > 1")
            out += ["--nnodes", str(self.nnodes), "--node-rank", str(rank), "--dist-init-addr", dist_init_addr]
        if rank == 0:
            out += ["--host", self.host, "--port", str(self.port)]
        elif node_port is not None:
            out += ["--host", self.host, "--port", str(node_port)]
        return out

    def http_host(self, node_ip: str) -> str:
        """The host to reach a node's HTTP server at: the node's IP when binding every interface, else ``host``."""
        return node_ip if self.host in ("0.0.0.0", "::", "") else self.host


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``["K=V", ...]`` -> dict; raises ValueError naming the bad item."""
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"--env expects KEY=VALUE, got {item!r}")
        out[k] = v
    return out


def parse_resources(items: Sequence[str]) -> dict[str, float]:
    """``["name=amount", ...]`` -> dict; raises ValueError naming the bad item."""
    out: dict[str, float] = {}
    for item in items:
        k, sep, v = item.partition("=")
        try:
            if not sep or not k:
                raise ValueError
            out[k] = float(v)
        except ValueError:
            raise ValueError(f"--resource expects NAME=AMOUNT, got {item!r}") from None
    return out
