"""One start of a multi-node group, from its agents to its shutdown.

:class:`NodeGroup` places one agent per rank (:mod:`xshare.deploy.placement`), asks rank 0's agent for its node IP
and a free port (``--dist-init-addr`` of every rank), starts each rank's server with SGLang's multi-node flags,
fetches the servers' output for the log sink, reports their exit codes, and stops the group: SIGTERM to every
rank's process group, SIGKILL after ``stop_grace``, then the agents are killed. Whether and when to start it again
is the supervisor's decision (:mod:`xshare.deploy.supervisor`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from xshare.deploy.launch_config import LaunchConfig
from xshare.deploy.placement import place_agents


class NodeGroup:
    """The agents and servers of one attempt. Ray errors of :meth:`start` and :meth:`exit_codes` propagate."""

    def __init__(self, cfg: LaunchConfig, pg: Any, log_sink: Callable[[int, str], None]) -> None:
        self.cfg = cfg
        self.log_sink = log_sink
        self.agents = place_agents(cfg, pg)
        self._cursors = [0] * cfg.nnodes
        self._tails: list[collections.deque[str]] = [collections.deque(maxlen=40) for _ in range(cfg.nnodes)]

    def start(self) -> dict[str, Any]:
        """Start every rank's server; returns ``dist_init_addr``, ``pids``, ``nodes`` (the agents' node info),
        ``url`` (rank 0's HTTP server) and ``node_urls`` (every rank's HTTP server)."""
        import ray

        cfg = self.cfg
        infos = ray.get([a.info.remote() for a in self.agents], timeout=cfg.pg_timeout)
        dist_port = cfg.dist_port or ray.get(self.agents[0].free_port.remote())
        dist_addr = f"{infos[0]['ip']}:{dist_port}" if cfg.nnodes > 1 else None
        # ranks >= 1: SGLang's per-node server (/health, and /metrics with --enable-metrics) on worker_port, or
        # on a free port of their node
        node_ports = [None] + (
            [cfg.worker_port] * (cfg.nnodes - 1) if cfg.worker_port
            else ray.get([a.free_port.remote() for a in self.agents[1:]])
        )
        pids = []
        for r, agent in enumerate(self.agents):
            argv = cfg.argv(r, dist_addr, python=infos[r]["python"], node_port=node_ports[r])
            pids.append(ray.get(agent.start.remote(argv, dict(cfg.env))))
        url = f"http://{cfg.http_host(infos[0]['ip'])}:{cfg.port}"
        return {
            "dist_init_addr": dist_addr,
            "pids": pids,
            "nodes": infos,
            "url": url,
            "node_urls": [url] + [f"http://{cfg.http_host(infos[r]['ip'])}:{node_ports[r]}"
                                  for r in range(1, cfg.nnodes)],
        }

    def pump_logs(self) -> None:
        """Hand every rank's new output lines to the log sink (a rank whose agent does not answer is left out)."""
        import ray

        refs = [a.logs.remote(c) for a, c in zip(self.agents, self._cursors, strict=True)]
        for r, ref in enumerate(refs):
            try:
                cur, lines = ray.get(ref, timeout=30)
            except ray.exceptions.RayError:
                continue
            self._cursors[r] = cur
            for line in lines:
                self._tails[r].append(line)
                self.log_sink(r, line)

    def exit_codes(self) -> list[int | None]:
        """Each rank's server exit code, None while it runs."""
        import ray

        return ray.get([a.poll.remote() for a in self.agents], timeout=30)

    def tail(self, rank: int, lines: int = 5) -> list[str]:
        """The last output lines of ``rank``'s server."""
        return list(self._tails[rank])[-lines:]

    def stop(self) -> list[Any] | None:
        """Stop every rank's server and kill the agents; returns the servers' exit codes (an ``error: ...`` string
        for an agent that did not answer), or None when the group was already stopped."""
        import ray

        if not self.agents:
            return None
        grace = self.cfg.stop_grace
        refs = [a.stop.remote(grace) for a in self.agents]
        codes: list[Any] = []
        for ref in refs:
            try:
                codes.append(ray.get(ref, timeout=grace + 30))
            except ray.exceptions.RayError as e:
                codes.append(f"error: {str(e).splitlines()[0]}")
        try:
            self.pump_logs()
        except Exception:  # noqa: BLE001 - best effort after a failure
            pass
        for a in self.agents:
            ray.kill(a, no_restart=True)
        self.agents = []
        return codes
