"""Helpers shared by the benchmark modes: argument parsing, output files, tables, timing."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from xshare._io import write_json_atomic  # noqa: F401 - the benchmarks' output writer


def int_list(name: str, *, minimum: int = 1) -> Callable[[str], list[int]]:
    """argparse type: '1,8,16' -> [1, 8, 16], every value >= ``minimum`` (errors name the option)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes comma-separated integers, got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"{name} values must be integers >= {minimum}, got {text!r}")
        return values

    return parse


def add_int_list(g: Any, flag: str, default: list[int] | None, help: str) -> None:  # noqa: A002 (argparse's name)
    """``flag LIST``: comma-separated integers >= 1 (:func:`int_list`) on the parser or argument group ``g``."""
    g.add_argument(flag, type=int_list(flag), default=default, metavar="LIST", help=help)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain right-aligned text table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


class Timer:
    """Median-of-samples wall-clock timing of several callables, interleaved so that background load
    hits them alike. ``sync`` runs after each call batch (``torch.cuda.synchronize`` on a GPU)."""

    def __init__(self, *, repeat: int, min_sample_s: float = 2e-3, sync: Callable[[], None] | None = None):
        self.repeat = max(1, int(repeat))
        self.min_sample_s = min_sample_s
        self.sync = sync or (lambda: None)

    def _calls_per_sample(self, fn: Callable[[], Any]) -> int:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        once = max(time.perf_counter() - t0, 1e-7)
        return max(1, min(10_000, int(self.min_sample_s / once)))

    def run(self, fns: dict[str, Callable[[], Any]], *, warmup: int = 2) -> dict[str, float]:
        """Median seconds per call of each callable."""
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        inner = {k: self._calls_per_sample(fn) for k, fn in fns.items()}
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(self.repeat):
            for k, fn in fns.items():
                self.sync()
                t0 = time.perf_counter()
                for _ in range(inner[k]):
                    fn()
                self.sync()
                samples[k].append((time.perf_counter() - t0) / inner[k])
        return {k: statistics.median(v) for k, v in samples.items()}
