"""The per-node agent of ``xshare launch``: a Ray actor on one node that runs that node's server process.

It starts the server command as the leader of a new session (process group) with ``PR_SET_PDEATHSIG``, so the
server dies with its agent; reads its output line by line for the driver to fetch (:meth:`NodeAgent.logs`);
reports its exit code; and stops it: SIGTERM to the whole process group, SIGKILL of what is left after a grace
period. Ray is imported only by :meth:`NodeAgent.info` and :func:`agent_class`.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any


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
