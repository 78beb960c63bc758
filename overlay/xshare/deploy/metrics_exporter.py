"""Serve a Prometheus multiprocess directory over HTTP (``python -m xshare.deploy.metrics_exporter``).

SGLang writes its metrics, and the XShare plugin's, through prometheus_client's multiprocess mode into
``PROMETHEUS_MULTIPROC_DIR``, but only node 0's HTTP server serves ``/metrics``: the schedulers of nodes with
``--node-rank`` >= 1 write files nobody reads. Running this exporter on those nodes (the Helm chart's
``metrics-exporter`` sidecar, or the Ray launcher's ``--worker-metrics-port``) with the same directory makes
their per-GPU series scrapeable, so a PodMonitor can scrape every pod of a multi-node group.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any


class _Exporter:
    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_exporter(directory: str, host: str, port: int) -> _Exporter:
    """Serve ``directory``'s metrics on ``http://host:port/metrics`` from a daemon thread."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"metrics directory {directory} does not exist")
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return _Exporter(server, thread)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xshare.deploy.metrics_exporter", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
                   help="the multiprocess directory (default: $PROMETHEUS_MULTIPROC_DIR)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=30001)
    args = p.parse_args(argv)
    if not args.dir:
        p.error("--dir is required when PROMETHEUS_MULTIPROC_DIR is not set")
    os.makedirs(args.dir, exist_ok=True)
    exp = start_exporter(args.dir, args.host, args.port)
    print(f"metrics_exporter: serving {args.dir} on http://{args.host}:{exp.port}/metrics", file=sys.stderr, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        exp.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
