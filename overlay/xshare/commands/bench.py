"""``xshare bench MODE``: benchmarks (one sub-command per module of :mod:`xshare.bench`)."""

from __future__ import annotations

import argparse

from xshare.bench import modes

NAME = "bench"
HELP = "benchmarks: 'selector' times the expert selector against vanilla top-k and the MoE layer's experts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_mode", metavar="MODE", required=True)
    for name, mod in modes().items():
        mp = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(mp)
        mp.set_defaults(_bench_run=mod.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)
