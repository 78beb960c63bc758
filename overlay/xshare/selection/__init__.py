"""Batch-aware MoE expert selection as pure tensor functions (depends on torch only).

    from xshare.selection import select, SelectorConfig, Routing
    routing = select(router_logits, top_k, SelectorConfig(policy="xshare", budget=32))
"""

from xshare.selection.api import select
from xshare.selection.config import SelectorConfig
from xshare.selection.knobs import SelectorKnobs
from xshare.selection.registry import Policy, available_policies, get_policy, register_policy
from xshare.selection.types import Placement, Routing

__all__ = [
    "Placement",
    "Policy",
    "Routing",
    "SelectorConfig",
    "SelectorKnobs",
    "available_policies",
    "get_policy",
    "register_policy",
    "select",
]
