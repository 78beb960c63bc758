"""The settings grid of ``xshare bench serve``: ``off``, ``topk``, and each policy over the knob it
declares for a sweep (``Policy.sweep_knob``: budget policies x budgets, warm-up policies x k0), and
the policies with a mass target x the target masses (budget E: tau alone decides)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from xshare.selection import available_policies, get_policy

DEFAULT_POLICIES = ("xshare", "lynx", "des_vote", "oea")
DEFAULT_BUDGETS = (0.25, 0.5, 0.75)
DEFAULT_OEA_K0 = (1, 2)  # k0 values of the policies swept over their warm-up


def supported(speculative: bool = False) -> list[str]:
    """Policies a served benchmark can run: with speculative decoding every policy; without, all but
    those that need request groups of several tokens (verify batches, which plain decode does not make)."""
    return [p for p in available_policies() if speculative or get_policy(p).groups != "required"]


@dataclass(frozen=True)
class Setting:
    """One selector setting of the sweep: ``off`` or a policy with its budget / warm-up."""

    name: str
    enabled: bool
    policy: str = "topk"
    budget: int | float = 0.5
    warmup_k: int = 1
    target_mass: float | None = None
    group_budget: int | float | None = None
    anchor_k: int | None = None

    def body(self) -> dict[str, Any]:
        """The ``PUT /xshare/config`` body."""
        body = {"enabled": self.enabled, "policy": self.policy, "budget": self.budget, "warmup_k": self.warmup_k}
        if self.target_mass is not None:
            body["target_mass"] = self.target_mass
        if self.group_budget is not None:
            body["group_budget"] = self.group_budget
        if self.anchor_k is not None:
            body["anchor_k"] = self.anchor_k
        return body

    def to_dict(self) -> dict[str, Any]:
        knobs = get_policy(self.policy).knobs if self.enabled else ()
        return {"name": self.name, "enabled": self.enabled, "policy": self.policy if self.enabled else None,
                "budget": self.budget if "budget" in knobs else None,
                "warmup_k": self.warmup_k if "warmup_k" in knobs else None,
                "target_mass": self.target_mass if "target_mass" in knobs else None,
                "group_budget": self.group_budget if "group_budget" in knobs else None,
                "anchor_k": self.anchor_k if "group_budget" in knobs else None}


def _fmt_budget(b: int | float) -> str:
    return str(b) if isinstance(b, int) else f"{b:g}"


def build_settings(policies: Sequence[str], budgets: Sequence[int | float], oea_k0: Sequence[int], *,
                   warmup_k: int = 1, include_topk: bool = True,
                   target_masses: Sequence[float] = (), speculative: bool = False,
                   group_budget: int | float | None = None,
                   anchors: Sequence[int | None] = (None,)) -> list[Setting]:
    """``off`` (always first), ``topk`` (optional), then each policy over its ``sweep_knob``: the
    budgets, or the warm-up values ``oea_k0``; a policy without one runs once. A policy with a mass
    target (``'target_mass' in Policy.knobs``) also runs at each of ``target_masses`` (budget 1.0 = E).
    ``speculative``: the server verifies drafts, so the per-request policies run too, with
    ``group_budget`` (None: the policy's default), once per value of ``anchors`` (``anchor_k``; None: the
    default, top_k)."""
    out = [Setting("off", False)]
    if include_topk:
        out.append(Setting("topk", True, "topk"))
    for p in policies:
        if p not in supported(speculative):
            raise ValueError(f"--policy: {p!r} is not supported here; choose from {', '.join(supported(speculative))}"
                             + ("" if speculative else " (per-request policies need --speculative-algorithm)"))
        policy = get_policy(p)
        variants = [({"group_budget": group_budget, "anchor_k": a}, "" if a is None else f",a={a}") for a in anchors] \
            if "group_budget" in policy.knobs else [({}, "")]
        if policy.vanilla:
            if not include_topk:
                out.append(Setting(p, True, p))
            continue
        if policy.sweep_knob == "budget":
            out.extend(Setting(f"{p}@{_fmt_budget(b)}{tag}", True, p, b, warmup_k, **groups)
                       for b in budgets for groups, tag in variants)
        elif policy.sweep_knob == "warmup_k":
            out.extend(Setting(f"{p}@k0={k}", True, p, warmup_k=k) for k in oea_k0)
        else:
            out.append(Setting(p, True, p, warmup_k=warmup_k))
        if "target_mass" in policy.knobs:
            out.extend(Setting(f"{p}@tau={t:g}", True, p, 1.0, warmup_k, target_mass=t) for t in target_masses)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate settings: {names}")
    return out


def parse_target_mass(text: str) -> float:
    """--target-mass: a number in (0, 1] (ValueError naming the flag)."""
    from xshare.selection.schema import parse_fraction

    return parse_fraction(text, "--target-mass")


def parse_budget(text: str) -> int | float:
    """--budget: an int >= 1 or a fraction of E in (0, 1] (ValueError naming the flag)."""
    from xshare.selection.config import parse_count

    return parse_count(text, "--budget")
