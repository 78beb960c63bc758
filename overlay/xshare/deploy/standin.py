"""Stand-in for ``sglang.launch_server`` in multi-node wiring tests (``python -m xshare.deploy.standin``).

It takes SGLang's multi-node command line (``--nnodes N --node-rank R --dist-init-addr HOST:PORT``, and
``--host/--port`` on node 0; every other argument is accepted and recorded) and does what an SGLang group does
with it, minus the model:

* every rank joins a real ``torch.distributed`` process group over ``tcp://<dist-init-addr>`` with the gloo
  backend (world size N, its rank) and checks an all-reduce of ``rank + 1`` (sum ``N(N+1)/2``);
* node 0 serves HTTP: ``GET /health`` (200 once the group formed), ``GET /info`` (JSON: argv, ranks, the
  all-reduce result, pid, ``CUDA_VISIBLE_DEVICES``, the ``XSHARE_*`` environment);
* all ranks then run a heartbeat all-reduce every ``--heartbeat`` seconds, so when one rank dies the others
  fail and exit non-zero, as an NCCL group does;
* ``--exit-after S --exit-code C`` makes the process exit by itself after S seconds (failure injection).

With ``--nnodes 1`` (or none) it skips the group and serves HTTP directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xshare.deploy.standin", description=__doc__.splitlines()[0])
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--dist-init-addr", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--dist-timeout", type=float, default=60.0)
    p.add_argument("--exit-after", type=float, default=None)
    p.add_argument("--exit-code", type=int, default=3)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = _parser().parse_known_args(argv)
    rank, world = args.node_rank, args.nnodes
    if world < 1 or not 0 <= rank < world:
        print(f"standin: bad --nnodes {world} / --node-rank {rank}", file=sys.stderr)
        return 2
    if world > 1 and not args.dist_init_addr:
        print("standin: --dist-init-addr is required with --nnodes > 1", file=sys.stderr)
        return 2
    log = lambda msg: print(f"standin rank {rank}/{world}: {msg}", flush=True)  # noqa: E731
    state: dict[str, Any] = {
        "argv": argv,
        "extra_args": extra,
        "nnodes": world,
        "node_rank": rank,
        "dist_init_addr": args.dist_init_addr,
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "xshare_env": {k: v for k, v in os.environ.items() if k.startswith("XSHARE_")},
        "allreduce_sum": None,
        "ready": False,
    }
    if args.exit_after is not None:
        def _exit_later() -> None:
            time.sleep(args.exit_after)
            log(f"exiting with {args.exit_code} (--exit-after {args.exit_after})")
            os._exit(args.exit_code)

        threading.Thread(target=_exit_later, daemon=True).start()

    dist = None
    if world > 1:
        import datetime

        import torch
        import torch.distributed as dist

        log(f"joining gloo group at tcp://{args.dist_init_addr}")
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{args.dist_init_addr}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=args.dist_timeout),
        )
        t = torch.tensor([rank + 1], dtype=torch.int64)
        dist.all_reduce(t)
        state["allreduce_sum"] = int(t.item())
        expected = world * (world + 1) // 2
        if state["allreduce_sum"] != expected:
            log(f"all-reduce gave {state['allreduce_sum']}, expected {expected}")
            return 4
        log(f"group formed: world {world}, all-reduce sum {state['allreduce_sum']}")
    state["ready"] = True

    server = None
    if rank == 0:
        server = ThreadingHTTPServer((args.host, args.port), _handler(state))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        log(f"serving on http://{args.host}:{args.port}")
    try:
        while True:
            time.sleep(args.heartbeat)
            if dist is not None:
                import torch

                t = torch.ones(1)
                dist.all_reduce(t)
    except Exception as e:  # noqa: BLE001 - a peer died: exit like a broken NCCL group
        log(f"heartbeat failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return 5
    finally:
        if server is not None:
            server.shutdown()


def _handler(state: dict[str, Any]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            if self.path == "/health":
                self._send(200 if state["ready"] else 503, b"ok" if state["ready"] else b"starting", "text/plain")
            elif self.path == "/info":
                self._send(200, json.dumps(state).encode(), "application/json")
            else:
                self._send(404, b"not found", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

    return Handler


if __name__ == "__main__":
    sys.exit(main())
