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

The parts, one module each (this module gathers their public names; importing it needs no Ray):

* :mod:`xshare.deploy.launch_config` -- :class:`LaunchConfig` and its checks, each node's command line, the
  bundles and the backoff; ``--env`` / ``--resource`` parsing;
* :mod:`xshare.deploy.node_agent` -- :class:`NodeAgent`, the per-node actor that runs, reads and stops a server;
* :mod:`xshare.deploy.placement` -- the placement group and the agents placed in it (steps 1 and 2);
* :mod:`xshare.deploy.group` -- one start of the group: wiring, logs, exit codes, stop (steps 2, 3 and 5);
* :mod:`xshare.deploy.events` -- the record of what happened, which callers and tests wait on;
* :mod:`xshare.deploy.supervisor` -- :class:`RayLauncher`: health checks, the restart policy, shutdown (step 4).
"""

from __future__ import annotations

from xshare.deploy.launch_config import (
    DEFAULT_SERVER_CMD,
    RESERVED_SERVER_FLAGS,
    STANDIN_SERVER_CMD,
    LaunchConfig,
    LaunchError,
    parse_env,
    parse_resources,
)
from xshare.deploy.node_agent import NodeAgent, agent_class
from xshare.deploy.supervisor import RayLauncher

__all__ = [
    "DEFAULT_SERVER_CMD",
    "RESERVED_SERVER_FLAGS",
    "STANDIN_SERVER_CMD",
    "LaunchConfig",
    "LaunchError",
    "NodeAgent",
    "RayLauncher",
    "agent_class",
    "parse_env",
    "parse_resources",
]
