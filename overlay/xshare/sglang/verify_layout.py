"""Which request each row of a speculative verify forward (``TARGET_VERIFY``) belongs to, read from
SGLang 0.5.23's verify layout, for the policies that group rows by request (``xshare_spec``,
``des_seq``).

* Static layout (``SGLANG_RAGGED_VERIFY_MODE=static``, the default; no ``ragged_verify_layout`` on
  the batch's ``spec_info``): every request verifies ``draft_token_num`` consecutive rows, row i
  belongs to request i // n.
* Ragged layouts (``cap-accept``, ``compact``): ``spec_info.ragged_verify_layout`` holds each
  request's row count; with the host copy (``verify_lens_cpu``) the rows map request by request.
  A layout without a host copy, or with one that does not fit the batch, cannot be mapped without
  reading the device: such a forward keeps SGLang's routing on every layer, counted by reason (the
  constants below), never routed with guessed groups. So does a ragged layout captured in a CUDA
  graph (its row counts change from replay to replay).

Pure Python apart from :func:`request_index` (torch); SGLang's objects are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Reasons a verify forward's rows are not mapped (skip reasons in the stats, prefixed by nothing)
RAGGED_DEVICE_ONLY = "verify_layout_ragged_device_only"
RAGGED_MISFIT = "verify_layout_ragged_misfit"
RAGGED_GRAPH = "verify_layout_ragged_graph"
ROWS_UNKNOWN = "verify_rows_unknown"
ROWS_MISMATCH = "verify_rows_mismatch"


@dataclass(frozen=True)
class VerifyRows:
    """The rows of each request of one verify forward: ``per_request`` (one count for every request:
    the static layout) or ``counts`` (each request's own), or ``reason`` when they cannot be told."""

    per_request: int = 1
    counts: tuple[int, ...] | None = None
    reason: str | None = None


def verify_rows(forward_batch: Any, tokens_per_req: int) -> VerifyRows:
    """The verify layout of ``forward_batch`` (an SGLang ``ForwardBatch`` in TARGET_VERIFY mode)."""
    spec = getattr(forward_batch, "spec_info", None)
    layout = getattr(spec, "ragged_verify_layout", None)
    if layout is None:
        return VerifyRows(per_request=max(1, int(tokens_per_req)))
    counts = getattr(layout, "verify_lens_cpu", None)
    if counts is None:
        return VerifyRows(reason=RAGGED_DEVICE_ONLY)
    counts = tuple(int(c) for c in counts)
    bs = getattr(forward_batch, "batch_size", None)
    if not counts or min(counts) < 1 or (bs is not None and len(counts) != int(bs)):
        return VerifyRows(reason=RAGGED_MISFIT)
    return VerifyRows(counts=counts)


def request_index(counts: tuple[int, ...], device: torch.device) -> Tensor:
    """int64 [sum(counts)]: request r owns the ``counts[r]`` rows after those of requests < r."""
    sizes = torch.tensor(counts, dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int64), sizes).to(device)
