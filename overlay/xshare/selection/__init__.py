"""Batch-aware MoE expert selection as pure tensor functions (depends on torch only).

    from xshare.selection import select, SelectorConfig, Routing
    routing = select(router_logits, top_k, SelectorConfig(policy="xshare", budget=32))

An engine's adapter routes each MoE layer call through :func:`xshare.selection.decide.decide`
(a :class:`~xshare.selection.call.LayerCall` in, a :class:`~xshare.selection.call.Decision` out), which
:func:`select` wraps. Layout: ``call`` (the seam's types), ``decide`` (the entry: picks the backend),
``checks`` (argument checks), ``backends/`` (torch reference, global mode, C, Triton), ``routers/``
(router families: specs and SGLang's reference routing), ``policies/`` with ``registry``, ``common``
(the policies' building blocks), ``config`` / ``schema`` / ``knobs`` (settings), ``types``.
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
