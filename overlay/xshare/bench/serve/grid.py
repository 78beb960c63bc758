"""The settings grid of ``xshare bench serve``: ``off``, ``topk``, each budgeted policy x budget, ``oea`` x k0."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_POLICIES = ("xshare", "lynx", "des_vote", "oea")
DEFAULT_BUDGETS = (0.25, 0.5, 0.75)
DEFAULT_OEA_K0 = (1, 2)
BUDGETED = ("xshare", "xshare_ep", "lynx", "des_vote", "des_seq")
SUPPORTED = BUDGETED + ("oea", "topk")


@dataclass(frozen=True)
class Setting:
    """One selector setting of the sweep: ``off`` or a policy with its budget / warm-up."""

    name: str
    enabled: bool
    policy: str = "topk"
    budget: int | float = 0.5
    warmup_k: int = 1

    def body(self) -> dict[str, Any]:
        """The ``PUT /xshare/config`` body."""
        return {"enabled": self.enabled, "policy": self.policy, "budget": self.budget, "warmup_k": self.warmup_k}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "enabled": self.enabled, "policy": self.policy if self.enabled else None,
                "budget": self.budget if self.enabled and self.policy in BUDGETED else None,
                "warmup_k": self.warmup_k if self.enabled and self.policy != "topk" else None}


def _fmt_budget(b: int | float) -> str:
    return str(b) if isinstance(b, int) else f"{b:g}"


def build_settings(policies: Sequence[str], budgets: Sequence[int | float], oea_k0: Sequence[int], *,
                   warmup_k: int = 1, include_topk: bool = True) -> list[Setting]:
    """``off`` (always first), ``topk`` (optional), each budgeted policy x budget, ``oea`` x k0."""
    out = [Setting("off", False)]
    if include_topk:
        out.append(Setting("topk", True, "topk"))
    for p in policies:
        if p not in SUPPORTED:
            raise ValueError(f"--policy: {p!r} is not supported here; choose from {', '.join(SUPPORTED)}")
        if p == "topk":
            if not include_topk:
                out.append(Setting("topk", True, "topk"))
            continue
        if p == "oea":
            out.extend(Setting(f"oea@k0={k}", True, "oea", warmup_k=k) for k in oea_k0)
        else:
            out.extend(Setting(f"{p}@{_fmt_budget(b)}", True, p, b, warmup_k) for b in budgets)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate settings: {names}")
    return out


def parse_budget(text: str) -> int | float:
    """--budget: an int >= 1 or a fraction of E in (0, 1] (ValueError naming the flag)."""
    from xshare.selection.config import parse_count

    return parse_count(text, "--budget")
