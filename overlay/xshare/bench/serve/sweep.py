"""The sweep: every setting on the same problems, ``rounds`` times in an interleaved order (off first),
pooled into one row per setting with its ratios to ``off``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from xshare.bench.serve.client import Client
from xshare.bench.serve.grid import Setting
from xshare.bench.serve.metrics import merge_windows, settled_metrics
from xshare.bench.serve.waves import BatchResult, run_waves


def _round_order(settings: Sequence[Setting], r: int) -> list[Setting]:
    """Round r: off first, then the others rotated by r (and reversed on odd rounds)."""
    rest = list(settings[1:])
    if rest:
        k = r % len(rest)
        rest = rest[k:] + rest[:k]
        if r % 2:
            rest.reverse()
    return [settings[0], *rest]


def sweep(client: Client, settings: Sequence[Setting], problems: Sequence[Any], *, clients: int, rounds: int,
          max_new_tokens: int, warmup_requests: int = 16, fresh_cache: bool = False,
          log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run every setting ``rounds`` times on the same ``problems``; per-setting figures. ``fresh_cache``:
    empty the server's caches before each setting's run (speculative decoding: NGRAM drafts from a
    corpus of the tokens served so far, which would otherwise hold the answers of the earlier runs)."""
    from xshare.models import tasks as T

    prompts = [p.prompt for p in problems]
    client.set_config(settings[0])
    if warmup_requests:
        warm = [p.prompt for p in T.heldout(warmup_requests, seed=10_000)]
        run_waves(client, warm, clients, max_new_tokens)
    batches: dict[str, list[BatchResult]] = {s.name: [] for s in settings}
    windows: dict[str, list[tuple[dict, dict]]] = {s.name: [] for s in settings}
    errors: list[str] = []
    for r in range(rounds):
        for s in _round_order(settings, r):
            client.set_config(s)
            if fresh_cache:
                client.flush_cache()
            before = settled_metrics(client)
            b = run_waves(client, prompts, clients, max_new_tokens)
            after = settled_metrics(client)
            batches[s.name].append(b)
            windows[s.name].append((before, after))
            errors.extend(f"{s.name}: {e}" for e in b.errors)
            if log is not None:
                dps = clients * b.decode_tokens / b.decode_seconds if b.decode_seconds else 0.0
                log(f"  round {r + 1}/{rounds} {s.name:<16} {b.requests}/{len(prompts)} answered, "
                    f"{b.completion_tokens / b.wall_seconds:7.1f} tok/s, decode {dps:7.1f} tok/s")
    client.set_config(settings[0])
    rows = []
    for s in settings:
        a = BatchResult.pool(batches[s.name])
        row = {**s.to_dict(), "requests": a.requests, "expected_requests": rounds * len(problems),
               "completion_tokens": a.completion_tokens, "decode_tokens": a.decode_tokens,
               "wall_seconds": round(a.wall_seconds, 3),
               "tokens_per_s": a.completion_tokens / a.wall_seconds if a.wall_seconds else None,
               "decode_tokens_per_s": clients * a.decode_tokens / a.decode_seconds if a.decode_seconds else None,
               "decode_tokens_per_s_rounds": [clients * b.decode_tokens / b.decode_seconds if b.decode_seconds else None
                                              for b in batches[s.name]],
               "accept_length": a.accept_length,
               "accuracy": T.accuracy(list(problems) * rounds, a.texts),
               "outputs_identical_across_rounds": all(b.texts == batches[s.name][0].texts for b in batches[s.name]),
               **merge_windows(windows[s.name])}
        rows.append(row)
    _fill_off(rows)
    return {"rows": rows, "errors": errors}


def _fill_off(rows: list[dict[str, Any]]) -> None:
    """Ratios to off; the off row's experts from vanilla top-k on the enabled settings' batches."""
    off = next((r for r in rows if r["name"] == "off"), None)
    if off is None:
        return
    vans = [r["vanilla_per_layer"] for r in rows if r["enabled"] and r.get("vanilla_per_layer")]
    peaks = [r["vanilla_peak_gpu_experts"] for r in rows if r["enabled"] and r.get("vanilla_peak_gpu_experts")]
    if vans:
        off["activated_per_layer"] = [sum(v[i] for v in vans) / len(vans) for i in range(len(vans[0]))]
        off["vanilla_per_layer"] = off["activated_per_layer"]
        off["experts_source"] = "vanilla top-k on the enabled settings' decode batches (the plugin records nothing " \
                                "while off)"
    if peaks:
        off["peak_gpu_experts"] = off["vanilla_peak_gpu_experts"] = sum(peaks) / len(peaks)
    for r in rows:
        for key in ("tokens_per_s", "decode_tokens_per_s", "accept_length"):
            r[key + "_ratio"] = r[key] / off[key] if r.get(key) and off.get(key) else None
        # the spread of the decode speed ratio: each round's ratio to off in the same round (min, max)
        per_round = [a / b for a, b in zip(r["decode_tokens_per_s_rounds"], off["decode_tokens_per_s_rounds"],
                                           strict=True) if a and b]
        r["decode_tokens_per_s_ratio_range"] = [min(per_round), max(per_round)] if per_round else None
        r["activated"] = (sum(r["activated_per_layer"]) / len(r["activated_per_layer"])
                          if r.get("activated_per_layer") else None)
        r["accuracy_delta_points"] = 100 * (r["accuracy"]["overall"] - off["accuracy"]["overall"])
