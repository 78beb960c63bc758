"""Multi-node SGLang launcher on Ray (``xshare launch``).

One model instance = one group of ``nnodes`` processes started with SGLang's own multi-node flags
(``--nnodes N --node-rank R --dist-init-addr HOST:PORT``), exactly as on bare metal or under a LeaderWorkerSet:

1. a placement group with one bundle per node (``{"CPU": c, "GPU": g}`` x N, ``STRICT_SPREAD``: every bundle on
   a different Ray node), optionally with bundle 0 pinned to the Ray head node (``rank0_on_head``);
2. one :class:`NodeAgent` actor per bundle; the agent of rank 0 reports its node IP and a free port, which
   becomes ``--dist-init-addr`` for every rank;
3. each agent starts the server command as the leader of a new session (process group), reads its output line
   by line and hands it to the driver, which prints it prefixed with ``[node R]``;
4. the driver health-checks rank 0's HTTP server (``GET /health``) until it answers 200, then supervises: when
   any rank's process exits (or its agent or node dies), the whole group is stopped and started again -- an NCCL
   group cannot survive the loss of one member (LWS calls this ``RecreateGroupOnPodRestart``) -- with at most
   ``max_restarts`` restarts and exponential backoff between attempts;
5. shutdown sends SIGTERM to every rank's process group, SIGKILL after ``stop_grace`` seconds, kills the agents and
   removes the placement group. The server processes also get ``PR_SET_PDEATHSIG`` so they die with their agent.

Ray's own ``CUDA_VISIBLE_DEVICES`` handling gives each agent (and so its server) the bundle's GPUs. Ranks >= 1 get
``--host/--port`` too: SGLang runs a small server there (``/health``, and ``/metrics`` for that node's processes
with ``--enable-metrics``); ``worker_port`` fixes its port, else each node picks a free one.
"""

from __future__ import annotations

import collections
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _pgroup_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class NodeAgent:
    """Runs one node's server process (a Ray actor: wrap with ``ray.remote``; see :func:`agent_class`)."""

    def __init__(self, rank: int, max_log_lines: int = 20000) -> None:
        self.rank = rank
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=max_log_lines)
        self._seq = 0
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "rank": self.rank,
            "ip": ray.util.get_node_ip_address(),
            "node_id": ctx.get_node_id(),
            "hostname": socket.gethostname(),
            "agent_pid": os.getpid(),
            "python": sys.executable,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def start(self, argv: list[str], env: dict[str, str]) -> int:
        """Start the server; returns its pid."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"rank {self.rank}: a server is already running (pid {self._proc.pid})")
        full_env = dict(os.environ)
        full_env.update(env)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self._proc = subprocess.Popen(
            argv,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_set_pdeathsig,
        )
        self._reader = threading.Thread(target=self._read, args=(self._proc,), daemon=True)
        self._reader.start()
        return self._proc.pid

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self._seq += 1
                self._lines.append((self._seq, line))
        proc.stdout.close()

    def logs(self, cursor: int) -> tuple[int, list[str]]:
        """Lines after ``cursor``; returns (new cursor, lines)."""
        with self._lock:
            out = [line for seq, line in self._lines if seq > cursor]
            return self._seq, out

    def poll(self) -> int | None:
        """The server's exit code, or None while it runs (or was never started)."""
        return None if self._proc is None else self._proc.poll()

    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stop(self, grace: float) -> int | None:
        """SIGTERM the server's process group, SIGKILL what is left after ``grace`` seconds."""
        proc = self._proc
        if proc is None:
            return None
        pgid = proc.pid
        if _pgroup_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (proc.poll() is None or _pgroup_alive(pgid)):
            time.sleep(0.05)
        if _pgroup_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        rc = proc.wait()
        while _pgroup_alive(pgid) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        if self._reader is not None:
            self._reader.join(timeout=2)
        return rc


_AGENT_CLASS: Any = None


def agent_class() -> Any:
    """:class:`NodeAgent` as a Ray actor class (created on first use, so importing this module needs no Ray)."""
    global _AGENT_CLASS
    if _AGENT_CLASS is None:
        import ray

        _AGENT_CLASS = ray.remote(max_restarts=0, max_task_retries=0)(NodeAgent)
    return _AGENT_CLASS


def _default_sink(rank: int, line: str) -> None:
    print(f"[node {rank}] {line}", file=sys.stderr, flush=True)


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
        self.events: list[dict[str, Any]] = []
        self._events_cv = threading.Condition()
        self._stop = threading.Event()
        self._pg: Any = None
        self._agents: list[Any] = []
        self._cursors: list[int] = []
        self._tails: list[collections.deque[str]] = []
        self.attempt = 0
        self.group: dict[str, Any] = {}

    # -- events ---------------------------------------------------------------------------------------
    def _event(self, kind: str, **details: Any) -> None:
        ev = {"type": kind, "time": time.time(), **details}
        with self._events_cv:
            self.events.append(ev)
            self._events_cv.notify_all()
        msg = " ".join(f"{k}={v}" for k, v in details.items())
        self.status_sink(f"{kind} {msg}".rstrip())

    def wait_for(self, kind: str, timeout: float, count: int = 1, **match: Any) -> dict[str, Any]:
        """Wait until ``count`` events of type ``kind`` (with the given fields) happened; return the last."""
        deadline = time.monotonic() + timeout
        with self._events_cv:
            while True:
                hits = [e for e in self.events if e["type"] == kind and all(e.get(k) == v for k, v in match.items())]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {kind} event #{count} {match or ''} in {timeout} s; events: {self.events}")
                self._events_cv.wait(left)

    def stop(self) -> None:
        """Ask ``run()`` to shut the group down and return."""
        self._stop.set()

    # -- main loop ------------------------------------------------------------------------------------
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
            self._create_placement_group()
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

    def _create_placement_group(self) -> None:
        import ray
        from ray.util.placement_group import placement_group

        cfg = self.config
        bundles = cfg.bundles()
        strategy = "STRICT_SPREAD" if cfg.nnodes > 1 else "STRICT_PACK"
        self._pg = placement_group(bundles, strategy=strategy, name="")
        try:
            ray.get(self._pg.ready(), timeout=cfg.pg_timeout)
        except ray.exceptions.GetTimeoutError:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            have = [{k: v for k, v in n["Resources"].items() if not k.startswith("node:")} for n in alive]
            raise LaunchError(
                f"placement group infeasible after {cfg.pg_timeout} s: need {cfg.nnodes} distinct nodes with "
                f"{bundles[0]} each ({strategy}); the cluster has {len(alive)} alive node(s) with {have}"
            ) from None
        self._event("placement_group_ready", bundles=len(bundles), strategy=strategy)

    def _start_agents(self) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.config
        cls = agent_class()
        self._agents = [
            cls.options(
                num_cpus=cfg.cpus_per_node,
                num_gpus=cfg.gpus_per_node,
                resources=dict(cfg.resources_per_node) or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=r
                ),
            ).remote(r)
            for r in range(cfg.nnodes)
        ]
        self._cursors = [0] * cfg.nnodes
        self._tails = [collections.deque(maxlen=40) for _ in range(cfg.nnodes)]

    def _run_group(self) -> str | None:
        """Start the group, wait until healthy, supervise. Returns why it ended, or None when stopped."""
        import ray

        cfg = self.config
        self.attempt += 1
        try:
            self._start_agents()
            infos = ray.get([a.info.remote() for a in self._agents], timeout=cfg.pg_timeout)
            dist_port = cfg.dist_port or ray.get(self._agents[0].free_port.remote())
            dist_addr = f"{infos[0]['ip']}:{dist_port}" if cfg.nnodes > 1 else None
            # ranks >= 1: SGLang's per-node server (/health, and /metrics with --enable-metrics) on worker_port, or
            # on a free port of their node
            node_ports = [None] + (
                [cfg.worker_port] * (cfg.nnodes - 1) if cfg.worker_port
                else ray.get([a.free_port.remote() for a in self._agents[1:]])
            )
            pids = []
            for r, agent in enumerate(self._agents):
                argv = cfg.argv(r, dist_addr, python=infos[r]["python"], node_port=node_ports[r])
                pids.append(ray.get(agent.start.remote(argv, dict(cfg.env))))
        except ray.exceptions.RayError as e:
            self._stop_group()
            return f"agent failure during start: {e}"
        http_host = infos[0]["ip"] if cfg.host in ("0.0.0.0", "::", "") else cfg.host
        self.group = {
            "attempt": self.attempt,
            "dist_init_addr": dist_addr,
            "pids": pids,
            "nodes": infos,
            "url": f"http://{http_host}:{cfg.port}",
            "node_urls": [f"http://{http_host}:{cfg.port}"] + [
                f"http://{infos[r]['ip'] if cfg.host in ('0.0.0.0', '::', '') else cfg.host}:{node_ports[r]}"
                for r in range(1, cfg.nnodes)
            ],
        }
        self._event(
            "started",
            attempt=self.attempt,
            dist_init_addr=dist_addr,
            pids=pids,
            node_ids=[i["node_id"] for i in infos],
            node_urls=self.group["node_urls"],
        )
        reason = self._supervise(self.group["url"] + cfg.health_path)
        self._stop_group()
        return reason

    def _pump_logs(self) -> None:
        import ray

        refs = [a.logs.remote(c) for a, c in zip(self._agents, self._cursors, strict=True)]
        for r, ref in enumerate(refs):
            try:
                cur, lines = ray.get(ref, timeout=30)
            except ray.exceptions.RayError:
                continue
            self._cursors[r] = cur
            for line in lines:
                self._tails[r].append(line)
                self.log_sink(r, line)

    def _supervise(self, health_url: str) -> str | None:
        import ray

        cfg = self.config
        started = time.monotonic()
        healthy = False
        failures = 0
        next_check = 0.0
        while True:
            self._pump_logs()
            if self._stop.is_set():
                return None
            try:
                codes = ray.get([a.poll.remote() for a in self._agents], timeout=30)
            except ray.exceptions.RayError as e:
                self._event("node_lost", attempt=self.attempt, error=str(e).splitlines()[0])
                return f"agent or node lost: {str(e).splitlines()[0]}"
            for r, rc in enumerate(codes):
                if rc is not None:
                    tail = list(self._tails[r])[-5:]
                    self._event("node_exit", attempt=self.attempt, rank=r, returncode=rc, tail=tail)
                    return f"node {r} exited with {rc}"
            now = time.monotonic()
            if now >= next_check:
                next_check = now + cfg.health_interval
                ok = _http_ok(health_url, timeout=min(5.0, cfg.health_interval * 2))
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

    def _stop_group(self) -> None:
        import ray

        if not self._agents:
            return
        refs = [a.stop.remote(self.config.stop_grace) for a in self._agents]
        codes: list[Any] = []
        for ref in refs:
            try:
                codes.append(ray.get(ref, timeout=self.config.stop_grace + 30))
            except ray.exceptions.RayError as e:
                codes.append(f"error: {str(e).splitlines()[0]}")
        try:
            self._pump_logs()
        except Exception:  # noqa: BLE001 - best effort after a failure
            pass
        for a in self._agents:
            ray.kill(a, no_restart=True)
        self._agents = []
        self._event("stopped", attempt=self.attempt, returncodes=codes)

    def _shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        self._stop_group()
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
            self._event("placement_group_removed")


def _http_ok(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


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
