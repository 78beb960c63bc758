"""``xshare launch``: start SGLang with the XShare plugin on one or more Ray nodes and keep it running.

Every argument that ``xshare launch`` does not know goes to the server command (by default
``xshare serve``, i.e. ``sglang.launch_server`` with the plugin on). Put them after ``--`` to be explicit::

    xshare launch --address auto --nnodes 2 --gpus-per-node 8 --port 30000 -- \\
        --model-path /models/Qwen3-30B-A3B --tp 16 --ep-size 16 --enable-metrics \\
        --xshare-policy xshare_ep --xshare-budget 0.5
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from xshare._io import usage_error
from xshare.deploy.launcher import DEFAULT_SERVER_CMD, STANDIN_SERVER_CMD, LaunchConfig, LaunchError

NAME = "launch"
HELP = "launch SGLang + XShare on a Ray cluster (one process per node, --nnodes/--node-rank/--dist-init-addr)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    g = parser.add_argument_group("cluster")
    g.add_argument("--address", default="auto", help="Ray cluster address (default: auto = RAY_ADDRESS or local)")
    g.add_argument("--nnodes", type=int, default=1, help="number of nodes (one bundle and process each)")
    g.add_argument("--gpus-per-node", type=float, default=0, help="GPUs per node (bundle 'GPU'; 0 for a CPU server)")
    g.add_argument("--cpus-per-node", type=float, default=1, help="CPUs reserved per node for the agent (bundle 'CPU')")
    g.add_argument("--resource", action="append", default=[], metavar="NAME=AMOUNT",
                   help="extra custom Ray resource per bundle (repeatable)")
    g.add_argument("--rank0-on-head", action="store_true",
                   help="pin node rank 0 (the HTTP server) to the Ray head node (KubeRay: the head pod's Service)")
    g.add_argument("--pg-timeout", type=float, default=300.0, help="seconds to wait for the placement group")
    s = parser.add_argument_group("server")
    s.add_argument("--server-cmd", default=DEFAULT_SERVER_CMD,
                   help=f"command each node runs, before the pass-through arguments; '{{python}}' = the node's "
                   f"interpreter (default: %(default)s; stand-in for wiring tests: '{STANDIN_SERVER_CMD}')")
    s.add_argument("--host", default="0.0.0.0", help="rank 0's HTTP bind address")
    s.add_argument("--port", type=int, default=30000, help="rank 0's HTTP port")
    s.add_argument("--dist-port", type=int, default=0, help="port of --dist-init-addr on rank 0 (0: a free one)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for every node's server, e.g. XSHARE_BUDGET=0.5 (repeatable)")
    s.add_argument("--worker-port", type=int, default=0,
                   help="--port of ranks >= 1 (SGLang's per-node /health and /metrics; 0: a free port per node)")
    h = parser.add_argument_group("supervision")
    h.add_argument("--health-path", default="/health", help="rank 0 health endpoint (default: %(default)s)")
    h.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds until rank 0 must be healthy")
    h.add_argument("--health-interval", type=float, default=2.0)
    h.add_argument("--max-health-failures", type=int, default=0,
                   help="restart after this many failed health checks once healthy (0: only on process exit)")
    h.add_argument("--max-restarts", type=int, default=3, help="whole-group restarts before giving up")
    h.add_argument("--backoff", type=float, default=5.0, help="seconds before the first restart (doubles, capped)")
    h.add_argument("--backoff-max", type=float, default=60.0)
    h.add_argument("--stop-grace", type=float, default=30.0, help="SIGTERM → SIGKILL delay at shutdown")
    parser.set_defaults(_accepts_extra=True)


def build_config(args: argparse.Namespace) -> LaunchConfig:
    from xshare.deploy.launcher import parse_env, parse_resources

    extra = [a for a in getattr(args, "_extra", []) if a != "--"]
    cfg = LaunchConfig(
        server_args=extra,
        server_cmd=args.server_cmd,
        nnodes=args.nnodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_node=args.cpus_per_node,
        resources_per_node=parse_resources(args.resource),
        host=args.host,
        port=args.port,
        dist_port=args.dist_port,
        env=parse_env(args.env),
        health_path=args.health_path,
        startup_timeout=args.startup_timeout,
        health_interval=args.health_interval,
        max_health_failures=args.max_health_failures,
        max_restarts=args.max_restarts,
        backoff_initial=args.backoff,
        backoff_max=args.backoff_max,
        stop_grace=args.stop_grace,
        pg_timeout=args.pg_timeout,
        rank0_on_head=args.rank0_on_head,
        worker_port=args.worker_port,
    )
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    try:
        cfg = build_config(args)
    except ValueError as e:
        return usage_error("xshare launch", e)
    try:
        from xshare.deploy.launcher import RayLauncher
    except ImportError as e:  # ray missing
        print(f"xshare launch: error: {e} (install ray: pip install 'xshare-sglang[deploy]')", file=sys.stderr)
        return 2
    launcher = RayLauncher(cfg, address=args.address)

    def _on_signal(signum: int, _frame: object) -> None:
        print(f"[xshare launch] signal {signal.Signals(signum).name}: shutting down", file=sys.stderr, flush=True)
        launcher.stop()

    try:
        launcher.connect()
        # after ray.init, which installs its own SIGTERM handler
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_signal)
            signal.signal(signal.SIGINT, _on_signal)
        return launcher.run()
    except LaunchError as e:
        print(f"xshare launch: error: {e}", file=sys.stderr)
        return 1
