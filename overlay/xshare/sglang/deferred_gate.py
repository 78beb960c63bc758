"""A gate SGLang skipped for the routing hook: on the CPU the C served path computes SGLang's grouped and
biased-grouped gates itself (bit for bit, :func:`xshare.selection.decide.gate_deferrable`), so when the
selector will route a layer call there, running SGLang's own gate first is wasted work (on the CPU test bed
its compiled gate costs more than the whole selection).

:class:`DeferredGate`: what the gate hook (:func:`xshare.sglang.hooks.routing.gate_hook`) hands SGLang in
place of the gate's outputs (zeros: valid ids, if anything read them) and how to run the gate after all
(:meth:`DeferredGate.fill` writes SGLang's own outputs into those tensors, in place), for a call the
selector then leaves to SGLang. The routing hook takes it back in the same ``select_experts`` call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class DeferredGate:
    """Placeholder outputs of one skipped gate call (weights float32 [T, k], ids int32 [T, k]) and the
    gate itself (``run``: SGLang's function with the call's arguments -> (weights, ids))."""

    def __init__(self, rows: int, top_k: int, device: torch.device, run: Callable[[], tuple[Tensor, Tensor]]) -> None:
        self.weights = torch.zeros(rows, top_k, dtype=torch.float32, device=device)
        self.ids = torch.zeros(rows, top_k, dtype=torch.int32, device=device)
        self._run = run
        self.filled = False

    def outputs(self) -> tuple[Tensor, Tensor]:
        """What SGLang's gate returns: (weights, ids)."""
        return self.weights, self.ids

    def fill(self) -> None:
        """Run SGLang's gate now and write its outputs into the placeholders (once)."""
        if self.filled:
            return
        weights, ids = self._run()
        self.weights.copy_(weights)
        self.ids.copy_(ids)
        self.filled = True

    def owns(self, topk_ids: object) -> bool:
        """Whether ``topk_ids`` (the routing hook's argument) is this gate's placeholder."""
        return topk_ids is self.ids
