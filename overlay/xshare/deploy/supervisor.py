"""The supervisor of ``xshare launch``: :class:`RayLauncher` keeps one multi-node group running on a Ray cluster.

It connects to the cluster, reserves the placement group once (:mod:`xshare.deploy.placement`), then loops:
start the group (:class:`~xshare.deploy.group.NodeGroup`), health-check rank 0's HTTP server (``GET /health``)
until it answers 200, and supervise it. When any rank's process exits (or its agent or node dies, or, with
``max_health_failures``, the health checks keep failing once healthy) the whole group is stopped and started again
-- an NCCL group cannot survive the loss of one member (LWS calls this ``RecreateGroupOnPodRestart``) -- with at
most ``max_restarts`` restarts and exponential backoff between them (:meth:`LaunchConfig.backoff`). Shutdown, on
:meth:`RayLauncher.stop` or after the last failure, stops the group and removes the placement group.
"""

from __future__ import annotations

import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from xshare.deploy import placement
from xshare.deploy.events import EventLog
from xshare.deploy.group import NodeGroup
from xshare.deploy.launch_config import LaunchConfig, LaunchError


def _default_sink(rank: int, line: str) -> None:
    print(f"[node {rank}] {line}", file=sys.stderr, flush=True)


def http_ok(url: str, timeout: float) -> bool:
    """Whether ``GET url`` answers 2xx within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


class RayLauncher:
    """Launches and supervises one multi-node group on a running Ray cluster.

    ``run()`` blocks until ``stop()`` is called (returns 0) or the group failed more than ``max_restarts``
    times (returns 1). ``events`` records what happened (type, time, details), for logs and tests.
    """

    def __init__(
        self,
        config: LaunchConfig,
        *,
        address: str | None = None,
        log_sink: Callable[[int, str], None] | None = None,
        status_sink: Callable[[str], None] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.address = address
        self.log_sink = log_sink or _default_sink
        self.status_sink = status_sink or (lambda msg: print(f"[xshare launch] {msg}", file=sys.stderr, flush=True))
        self._log = EventLog()
        self._stop = threading.Event()
        self._pg: Any = None
        self._group: NodeGroup | None = None
        self.attempt = 0
        self.group: dict[str, Any] = {}

    # -- events ---------------------------------------------------------------------------------------
    @property
    def events(self) -> list[dict[str, Any]]:
        return self._log.events

    def _event(self, kind: str, **details: Any) -> None:
        self._log.record(kind, **details)
        msg = " ".join(f"{k}={v}" for k, v in details.items())
        self.status_sink(f"{kind} {msg}".rstrip())

    def wait_for(self, kind: str, timeout: float, count: int = 1, **match: Any) -> dict[str, Any]:
        """Wait until ``count`` events of type ``kind`` (with the given fields) happened; return the last."""
        return self._log.wait_for(kind, timeout, count, **match)

    def stop(self) -> None:
        """Ask ``run()`` to shut the group down and return."""
        self._stop.set()

    # -- main loop: the restart policy ----------------------------------------------------------------
    def connect(self) -> None:
        """Connect this process to the Ray cluster (once). Ray installs its own SIGTERM handler here: a caller
        that handles signals must install its handlers after this."""
        import ray

        if not ray.is_initialized():
            try:
                ray.init(address=self.address or "auto", log_to_driver=False)
            except ConnectionError as e:
                raise LaunchError(f"cannot connect to a Ray cluster at {self.address or 'auto'}: {e}") from e

    def run(self) -> int:
        cfg = self.config
        self.connect()
        try:
            self._pg = placement.reserve(cfg)
            self._event("placement_group_ready", bundles=cfg.nnodes, strategy=placement.strategy(cfg))
            restarts = 0
            while not self._stop.is_set():
                reason = self._run_group()
                if reason is None:  # stop requested
                    break
                if restarts >= cfg.max_restarts:
                    self._event("gave_up", attempts=self.attempt, restarts=restarts, reason=reason)
                    return 1
                restarts += 1
                delay = cfg.backoff(restarts)
                self._event("restart", restart=restarts, backoff_s=round(delay, 3), reason=reason)
                if self._stop.wait(delay):
                    break
            return 0
        finally:
            self._shutdown()

    def _run_group(self) -> str | None:
        """Start the group, wait until healthy, supervise. Returns why it ended, or None when stopped."""
        import ray

        cfg = self.config
        self.attempt += 1
        try:
            self._group = NodeGroup(cfg, self._pg, self.log_sink)
            started = self._group.start()
        except ray.exceptions.RayError as e:
            self._stop_group()
            return f"agent failure during start: {e}"
        self.group = {"attempt": self.attempt, **started}
        self._event(
            "started",
            attempt=self.attempt,
            dist_init_addr=started["dist_init_addr"],
            pids=started["pids"],
            node_ids=[i["node_id"] for i in started["nodes"]],
            node_urls=started["node_urls"],
        )
        reason = self._supervise(self._group, started["url"] + cfg.health_path)
        self._stop_group()
        return reason

    # -- supervision: exits and health ----------------------------------------------------------------
    def _supervise(self, group: NodeGroup, health_url: str) -> str | None:
        import ray

        cfg = self.config
        started = time.monotonic()
        healthy = False
        failures = 0
        next_check = 0.0
        while True:
            group.pump_logs()
            if self._stop.is_set():
                return None
            try:
                codes = group.exit_codes()
            except ray.exceptions.RayError as e:
                self._event("node_lost", attempt=self.attempt, error=str(e).splitlines()[0])
                return f"agent or node lost: {str(e).splitlines()[0]}"
            for r, rc in enumerate(codes):
                if rc is not None:
                    self._event("node_exit", attempt=self.attempt, rank=r, returncode=rc, tail=group.tail(r))
                    return f"node {r} exited with {rc}"
            now = time.monotonic()
            if now >= next_check:
                next_check = now + cfg.health_interval
                ok = http_ok(health_url, timeout=min(5.0, cfg.health_interval * 2))
                if ok and not healthy:
                    healthy = True
                    failures = 0
                    self._event("healthy", attempt=self.attempt, url=health_url, after_s=round(now - started, 2))
                elif healthy and not ok:
                    failures += 1
                    if cfg.max_health_failures and failures >= cfg.max_health_failures:
                        self._event("unhealthy", attempt=self.attempt, failures=failures)
                        return f"{failures} failed health checks"
                elif ok:
                    failures = 0
                if not healthy and now - started > cfg.startup_timeout:
                    self._event("startup_timeout", attempt=self.attempt, after_s=round(now - started, 2))
                    return f"not healthy after {cfg.startup_timeout} s"
            self._stop.wait(cfg.poll_interval)

    # -- shutdown ---------------------------------------------------------------------------------------
    def _stop_group(self) -> None:
        codes = self._group.stop() if self._group is not None else None
        if codes is not None:
            self._event("stopped", attempt=self.attempt, returncodes=codes)

    def _shutdown(self) -> None:
        self._stop_group()
        if self._pg is not None:
            placement.release(self._pg)
            self._pg = None
            self._event("placement_group_removed")
