"""Part 1: the fused Triton selector against the torch reference ``select`` on the run's device, over
the interpreter tests' cases (:mod:`xshare.selection.backends.triton.cases`) and ``--extra-cases`` more."""

from __future__ import annotations

import time
from typing import Any

from xshare.bench.gpu.context import Context


def selector_cases(ctx: Context) -> list[tuple[str, dict[str, Any]]]:
    from xshare.selection.backends.triton.cases import POLICIES, SCORINGS, grid_cases, random_case, special_cases

    cases = list(grid_cases(ctx.seeds))
    special = list(special_cases())
    if ctx.cpu:  # CI size: the all-tied cases and one GPU-cap case
        special = [c for c in special if c[0].startswith("all_tied") or c[0] == "gpu_caps[G=4-cap=2]"]
    cases += special
    families = [(p, s, r) for p in POLICIES for s in SCORINGS for r in (True, False)]
    for i in range(ctx.extra):
        p, s, r = families[i % len(families)]
        cases.append((f"extra[{p}-{s}-renorm={r}-seed={100_000 + i}]", random_case(100_000 + i, p, s, r)))
    return cases


def part_selector_vs_reference(ctx: Context) -> dict[str, Any]:
    from xshare.selection import select
    from xshare.selection.backends.triton.cases import compare, to_device

    cases = selector_cases(ctx)
    failures, families, done = [], {}, 0
    t0 = time.monotonic()
    for name, kw in cases:
        if ctx.past("selector_vs_reference"):
            break
        kwd = to_device(kw, ctx.device)
        ref = select(**kwd)
        got = select(**kwd, backend="triton")
        ctx.sync()
        diffs = compare(ref, got)
        cfg = kw["config"]
        fam = f"{cfg.policy}/{cfg.scoring}/renorm={cfg.renormalize}"
        f = families.setdefault(fam, {"cases": 0, "passed": 0})
        f["cases"] += 1
        f["passed"] += not diffs
        done += 1
        if diffs:
            failures.append({"case": name, "diffs": diffs})
    return {
        "status": "ok" if not failures and done == len(cases) else ("fail" if failures else "incomplete"),
        "cases": len(cases), "run": done, "passed": done - len(failures), "failures": failures[:50],
        "families": families, "seconds": time.monotonic() - t0,
        "reference": f"xshare.selection.select on {ctx.device.type}", "tolerance": "ids identical, weights 1e-6",
    }
