"""Start and stop a real SGLang server (through ``xshare serve``) from Python: for tests, demos and
benchmarks. Imports nothing from sglang.

    with ServerProcess(model_dir, port, xshare_args=["--xshare-budget", "4"], device="cpu") as srv:
        srv.generate("def f(x):", max_new_tokens=8)

The server runs in its own process group (``start_new_session``), so :meth:`ServerProcess.stop`
can check that no process of it is left behind, and kill the group if one is.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def processes(field: str) -> Iterator[tuple[int, bytes]]:
    """(pid, the bytes of ``/proc/<pid>/<field>``) of every process whose file can be read now (Linux)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            yield int(entry.name), (entry / field).read_bytes()
        except OSError:  # the process ended, or its file is not ours to read
            continue


def group_processes(pgid: int) -> list[int]:
    """PIDs (alive, not zombies) whose process group is ``pgid`` (Linux /proc)."""
    pids = []
    for pid, raw in processes("stat"):
        stat = raw.decode(errors="replace")
        fields = stat[stat.rindex(")") + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            pids.append(pid)
    return pids


class ServerError(RuntimeError):
    pass


class ServerProcess:
    """One SGLang HTTP server on 127.0.0.1, launched by ``python -m xshare.cli serve``."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        port: int | None = None,
        *,
        xshare_args: Sequence[str] = (),
        sglang_args: Sequence[str] = (),
        device: str = "cpu",
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        startup_timeout: float = 240.0,
    ) -> None:
        self.model_path = str(model_path)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "xshare.cli", "serve", *xshare_args, "--model-path", self.model_path,
                    "--device", device, "--host", "127.0.0.1", "--port", str(self.port), "--skip-server-warmup",
                    "--sleep-on-idle", *sglang_args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._log_file: Any = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> ServerProcess:
        out = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
            out = self._log_file
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = t0 + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"the server exited with code {self.proc.returncode} during startup; "
                                  f"log: {self.log_tail()}")
            if self.healthy():
                self.startup_seconds = time.monotonic() - t0
                return self
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"the server did not become healthy within {self.startup_timeout:.0f} s; "
                          f"log: {self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> list[int]:
        """SIGTERM the server, wait; SIGKILL its process group if anything is left. Returns the PIDs
        that were still alive after the graceful timeout (empty = clean stop)."""
        if self.proc is None:
            return []
        pgid = self.proc.pid
        leftovers: list[int] = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and group_processes(pgid):
            time.sleep(0.25)
        leftovers = group_processes(pgid)
        if leftovers or self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return leftovers

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log file)"
        return self.log_path.read_text(errors="replace")[-chars:]

    # -- HTTP -------------------------------------------------------------------------------------
    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def post(self, path: str, payload: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        req = urllib.request.Request(self.base_url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def generate(self, text: str, max_new_tokens: int = 16, **sampling: Any) -> dict[str, Any]:
        params = {"max_new_tokens": max_new_tokens, "temperature": 0, **sampling}
        return self.post("/generate", {"text": text, "sampling_params": params})

    def completion(self, prompt: str, max_tokens: int = 16, **kw: Any) -> dict[str, Any]:
        return self.post("/v1/completions", {"model": self.model_path, "prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0, **kw})

    def children(self) -> list[tuple[int, str]]:
        """(pid, process title) of the server's process group."""
        out = []
        if self.proc is None:
            return out
        for pid in group_processes(self.proc.pid):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            out.append((pid, title))
        return out
