"""Where a group runs: one Ray placement group with one bundle per node, and one :class:`NodeAgent` actor in each.

``STRICT_SPREAD`` puts every bundle of a multi-node group on a different Ray node (``STRICT_PACK`` for one node);
``rank0_on_head`` pins bundle 0 to the Ray head node. The placement group lives as long as the launcher and
serves every restart of the group; the agents are created anew for each start.
"""

from __future__ import annotations

from typing import Any

from xshare.deploy.launch_config import LaunchConfig, LaunchError
from xshare.deploy.node_agent import agent_class


def strategy(cfg: LaunchConfig) -> str:
    """The placement group's strategy: a different Ray node per rank when there are several."""
    return "STRICT_SPREAD" if cfg.nnodes > 1 else "STRICT_PACK"


def reserve(cfg: LaunchConfig) -> Any:
    """Create the placement group and wait up to ``pg_timeout`` for it; :class:`LaunchError` naming what the
    cluster has when it cannot be placed."""
    import ray
    from ray.util.placement_group import placement_group

    bundles = cfg.bundles()
    pg = placement_group(bundles, strategy=strategy(cfg), name="")
    try:
        ray.get(pg.ready(), timeout=cfg.pg_timeout)
    except ray.exceptions.GetTimeoutError:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        have = [{k: v for k, v in n["Resources"].items() if not k.startswith("node:")} for n in alive]
        raise LaunchError(
            f"placement group infeasible after {cfg.pg_timeout} s: need {cfg.nnodes} distinct nodes with "
            f"{bundles[0]} each ({strategy(cfg)}); the cluster has {len(alive)} alive node(s) with {have}"
        ) from None
    return pg


def place_agents(cfg: LaunchConfig, pg: Any) -> list[Any]:
    """One agent actor per rank, rank ``r`` in bundle ``r`` (with that bundle's CPUs, GPUs and resources)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cls = agent_class()
    return [
        cls.options(
            num_cpus=cfg.cpus_per_node,
            num_gpus=cfg.gpus_per_node,
            resources=dict(cfg.resources_per_node) or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=r),
        ).remote(r)
        for r in range(cfg.nnodes)
    ]


def release(pg: Any) -> None:
    """Remove the placement group (its bundles' resources go back to the cluster)."""
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(pg)
