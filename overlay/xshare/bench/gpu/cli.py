"""The command line of ``xshare bench gpu``: ``MODE``, ``HELP``, ``add_arguments`` and ``run`` (what the
bench registry, :func:`xshare.bench.modes`, needs), and the argument checks."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from xshare._io import help_epilog, usage_error
from xshare.bench._common import add_int_list
from xshare.bench.gpu.context import CPU_TIME_BUDGET, GPU_TIME_BUDGET, PARTS
from xshare.bench.gpu.runner import run_parts

MODE = "gpu"
HELP = ("the prepared GPU check: Triton selector vs reference, CUDA-graph replays, selector and MoE-layer "
        "times, the served routing path in a CUDA graph (--cpu: the same on the CPU at CI size)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    help_epilog(p, (
        "On the GPU machine (nothing installed but torch/triton/numpy):\n"
        "  PYTHONPATH=overlay python -m xshare bench gpu --out $OUT\n"
        "In CI (no GPU): xshare bench gpu --cpu --out DIR\n"
        "Writes DIR/gpu_check.json and DIR/gpu_check.md after every part. Exit status 0 when every check\n"
        "passed, 1 when one failed or a part raised (the report says which), 2 for bad arguments.\n"
        "See docs/kernel.md (GPU check)."
    ))
    p.add_argument("--cpu", action="store_true", help="CPU mode: interpreter / torch, tiny sizes (CI)")
    p.add_argument("--out", default="gpu-check", help="output folder (default gpu-check/)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, in order (default all: {','.join(PARTS)})")
    p.add_argument("--time-budget", type=float, default=None,
                   help=f"seconds; parts stop starting new work past their share of it (default "
                        f"{GPU_TIME_BUDGET:.0f} on a GPU: the whole check within 5 minutes on an H200; "
                        f"{CPU_TIME_BUDGET:.0f} with --cpu)")
    p.add_argument("--seeds-per-family", type=int, default=None,
                   help="random seeds per (policy, scoring, renormalise) family (default 6 = the tests'; 2 with --cpu)")
    p.add_argument("--extra-cases", type=int, default=None,
                   help="further random cases beyond the tests' (default 200 on a GPU, 0 with --cpu)")
    add_int_list(p, "--batch", None, "part 3 batch sizes (default 1,8,16,32,64; 1,8 with --cpu)")
    add_int_list(p, "--experts", None, "part 3 experts per layer (default 64,128,256; 16 with --cpu)")
    add_int_list(p, "--top-k", None, "part 3 experts per token (default 4,6,8; 4 with --cpu)")
    add_int_list(p, "--moe-batch", None, "part 4 batch sizes (default 16,32; 8 with --cpu)")
    add_int_list(p, "--served-batch", None, "part 5 batch sizes (default 1,16,64; 1,4 with --cpu)")
    p.add_argument("--replays", type=int, default=None,
                   help="graph replays per timing sample (default 50 on a GPU, 2 with --cpu)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes that compile the kernels before the parts run (default min(8, CPUs - 1) "
                        "on a GPU; 0 = compile in the parts)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def check_args(args: argparse.Namespace) -> list[str]:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"--parts must name parts of {', '.join(PARTS)}, got {args.parts!r}")
    for name in ("seeds_per_family", "extra_cases", "jobs"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if args.replays is not None and args.replays < 1:
        raise ValueError(f"--replays must be >= 1, got {args.replays}")
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError(f"--time-budget must be > 0, got {args.time_budget}")
    if not args.cpu and not torch.cuda.is_available():
        raise ValueError("no CUDA device here: pass --cpu for the CPU mode")
    from xshare.selection.backends.triton.route import triton_available

    if not triton_available():
        raise ValueError("Triton is not importable: the check runs the Triton kernels (pip install triton)")
    return parts


def run(args: argparse.Namespace) -> int:
    try:
        parts = check_args(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:
        return usage_error("xshare bench gpu", e)
    return run_parts(args, parts, out)
