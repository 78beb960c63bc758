"""The admin endpoint's fan-out from the HTTP process: one config message to every scheduler rank
through SGLang's tokenizer manager (``set_internal_state``), and every rank's state back
(``get_internal_state``: each rank's version, config and outcome, each reporting rank's last metrics
summary); the served model's shape and world size as SGLang's HTTP process knows them."""

from __future__ import annotations

import asyncio
from typing import Any

from xshare.selection.types import ModelShape
from xshare.sglang.admin.common import ACTIVATION_MARGIN, APPLY_TIMEOUT_S, VIEW_KEY, encode_message
from xshare.sglang.admin.store import AdminState
from xshare.sglang.model_shape import moe_layer_ids, moe_shape


def _tokenizer_manager() -> Any:
    from sglang.srt.entrypoints import http_server

    return http_server._global_state.tokenizer_manager


def served_model_shape() -> ModelShape | None:
    """The served model's :class:`~xshare.selection.types.ModelShape`, from the tokenizer manager's config."""
    hf = getattr(getattr(_tokenizer_manager(), "model_config", None), "hf_text_config", None)
    top_k, e = moe_shape(hf)
    return ModelShape(num_experts=e, top_k=top_k, moe_layers=moe_layer_ids(hf)) if e and top_k else None


def expected_ranks() -> int:
    """The scheduler ranks of the whole group, from SGLang's own view of the world size."""
    from sglang.srt.server_args import compute_world_size

    sa = _tokenizer_manager().server_args
    return compute_world_size(dp_size=int(sa.dp_size or 1), tp_size=int(sa.tp_size or 1),
                              pp_size=int(sa.pp_size or 1))


async def group_state() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every rank's state, each reporting rank's last metrics summary), through SGLang's
    get_internal_state (every DP rank answers for its TP group)."""
    replies = await asyncio.wait_for(_tokenizer_manager().get_internal_state(), APPLY_TIMEOUT_S)
    ranks: dict[int, dict[str, Any]] = {}
    stats = []
    for reply in replies:
        part = (reply or {}).get(VIEW_KEY) or {}
        for r in part.get("ranks") or []:
            ranks[int(r["rank"])] = r
        if part.get("stats"):
            stats.append(part["stats"])
    return [ranks[k] for k in sorted(ranks)], sorted(stats, key=lambda s: s.get("rank", 0))


def activation_forward(ranks: list[dict[str, Any]]) -> int | None:
    """The forward count at which every rank switches to a new config, where ranks route shared rows
    (attention DP over a TP MoE: every DP rank's event loop takes the message at its own step, and a step
    routed under two configs would sum mismatched partials): :data:`ACTIVATION_MARGIN` past the furthest
    rank's count (DP ranks run their forwards in lockstep); None (at once) where no rank does."""
    if not any(r.get("shared_rows") for r in ranks):
        return None
    return max(int(r.get("forwards") or 0) for r in ranks) + ACTIVATION_MARGIN


async def fan_out(state: AdminState, version: int, config: dict[str, Any], source: str) -> tuple[bool, str]:
    """Send one config to every rank (SGLang's control path) and check that every rank of the group
    is on it: (True, '') or (False, why, naming the rank). Ranks that route shared rows switch at one
    forward count (:func:`activation_forward`)."""
    from sglang.srt.managers.io_struct import SetInternalStateReq

    try:
        at_forward = activation_forward((await group_state())[0])
    except TimeoutError:
        return False, f"the schedulers did not report their state within {APPLY_TIMEOUT_S:.0f} s"
    key = encode_message(version, config, source, state.channel_key, at_forward=at_forward)
    try:
        replies = await asyncio.wait_for(
            _tokenizer_manager().set_internal_state(SetInternalStateReq(server_args={key: 1})), APPLY_TIMEOUT_S)
    except TimeoutError:
        return False, f"the schedulers did not answer within {APPLY_TIMEOUT_S:.0f} s"
    try:
        ranks, _ = await group_state()
    except TimeoutError:
        return False, f"the schedulers did not report their state within {APPLY_TIMEOUT_S:.0f} s"
    refused = [r for r in ranks if not r.get("ok", True)]
    if refused:
        return False, "; ".join(f"rank {r['rank']} ({r.get('node', '?')}) refused: {r.get('why')}" for r in refused)
    if not replies or not all(replies):
        return False, f"a scheduler group refused version {version} (replies {replies})"
    expected = expected_ranks()
    missing = sorted(set(range(expected)) - {int(r["rank"]) for r in ranks})
    if missing:
        return False, f"rank(s) {missing} of {expected} did not report"
    behind = [r["rank"] for r in ranks if r.get("version") != version or r.get("config") != config]
    if behind:
        return False, f"rank(s) {behind} are not on version {version}"
    return True, ""
