"""Per-request settings a client sends through SGLang's own request API.

Exact routing: ``custom_params`` of the sampling parameters (SGLang 0.5.23 carries them with every
request to the scheduler, ``Req.sampling_params.custom_params``):

* ``/generate``: ``{"text": ..., "sampling_params": {"custom_params": {"xshare_exact": true}}}``;
* ``/v1/completions`` and ``/v1/chat/completions``: the top-level field ``"custom_params":
  {"xshare_exact": true}`` (OpenAI clients: ``extra_body={"custom_params": {"xshare_exact": True}}``).

That request's tokens keep the model's own top-k routing; the others in the batch share the rest of
the budget. The value must be JSON ``true`` or ``false``: anything else is refused when SGLang checks
the sampling parameters (its usual 400 answer for a bad parameter), before the request is queued.

No SGLang import: SGLang passes its objects in.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from xshare.sglang import state as state_mod

EXACT_KEY = "xshare_exact"
VERIFY_TARGET = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
INIT_FORWARD_BATCH_TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
# The per-request flags of a forward batch, set on it by init_forward_batch_hook.
EXACT_ATTR = "_xshare_exact"


def check_exact_flag(custom_params: Any) -> None:
    """ValueError naming the field unless ``custom_params[EXACT_KEY]`` is absent, true or false."""
    if not isinstance(custom_params, dict) or EXACT_KEY not in custom_params:
        return
    value = custom_params[EXACT_KEY]
    if not isinstance(value, bool):
        raise ValueError(f"custom_params[{EXACT_KEY!r}] must be true or false, got {value!r}")


def wants_exact(custom_params: Any) -> bool:
    """Whether a request's ``custom_params`` ask for exact routing (only a literal true does)."""
    return isinstance(custom_params, dict) and custom_params.get(EXACT_KEY) is True


def exact_flags(reqs: Iterable[Any]) -> list[bool] | None:
    """One flag per request of a batch (SGLang ``Req`` objects), or None when no request asks."""
    flags = [wants_exact(getattr(getattr(r, "sampling_params", None), "custom_params", None)) for r in reqs]
    return flags if any(flags) else None


def verify_hook(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``SamplingParams.verify(self, vocab_size)`` (the HTTP process): a bad flag is a bad parameter."""
    check_exact_flag(getattr(self, "custom_params", None))
    return None


def init_forward_batch_hook(result: Any, cls: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``ForwardBatch.init_new(cls, batch, model_runner, ...)``: the per-request exact flags of the
    batch (None when no request asks) on the forward batch, for the forward hook. Per request, not per token."""
    try:
        setattr(result, EXACT_ATTR, exact_flags(getattr(batch, "reqs", None) or ()))
    except Exception:  # noqa: BLE001 - never break a forward; counted, the forward then has no exact rows
        runtime = state_mod.get()
        if runtime is not None:
            runtime.stats.count_fallback("exact_flags")
    return None
