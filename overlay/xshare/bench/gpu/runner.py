"""The parts in order under the time budget: warm-up, then each part, the report (JSON and markdown)
rewritten after each so that a run cut off still leaves the parts it finished."""

from __future__ import annotations

import argparse
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from xshare.bench._common import write_json_atomic
from xshare.bench.gpu.context import Context
from xshare.bench.gpu.correctness import part_selector_vs_reference
from xshare.bench.gpu.graphs import part_cuda_graph
from xshare.bench.gpu.moe_layer import part_moe_layer
from xshare.bench.gpu.report import markdown, meta
from xshare.bench.gpu.served import part_served_path
from xshare.bench.gpu.timing import part_selector_timing
from xshare.bench.gpu.warmup import warm

PART_FNS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "selector_vs_reference": part_selector_vs_reference,
    "cuda_graph": part_cuda_graph,
    "selector_timing": part_selector_timing,
    "moe_layer": part_moe_layer,
    "served_path": part_served_path,
}


def run_parts(args: argparse.Namespace, parts: list[str], out: Path) -> int:
    """Run ``parts`` (checked, in this order) with the report in the folder ``out``: 0 when every check
    passed, 1 when one failed or a part raised."""
    ctx = Context(args)
    torch.manual_seed(args.seed)
    if ctx.cpu:
        torch.set_num_threads(1)
    report: dict[str, Any] = {"schema": "xshare-gpu-check/1", "meta": meta(ctx), "parts": {}}
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"

    def save() -> None:
        report["seconds"] = ctx.elapsed()
        write_json_atomic(json_path, report)
        tmp = md_path.with_suffix(".md.tmp")
        tmp.write_text(markdown(report))
        os.replace(tmp, md_path)

    save()
    report["warmup"] = warm(ctx, parts)
    failed = False
    for name in parts:
        print(f"[{ctx.elapsed():6.1f} s] {name} ...", flush=True)
        t0 = time.monotonic()
        try:
            result = PART_FNS[name](ctx)
        except Exception:  # noqa: BLE001 - a part that raises is reported, and the next part still runs
            result = {"status": "error", "error": traceback.format_exc()}
        result["seconds_total"] = time.monotonic() - t0
        report["parts"][name] = result
        failed |= result["status"] in ("fail", "error")
        save()
        print(f"[{ctx.elapsed():6.1f} s] {name}: {result['status']}", flush=True)
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return 1 if failed else 0
