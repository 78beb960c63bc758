"""Forward batches to replay: decode-like ones built from the sequences, or the recorded ones.

Both give a :class:`Batches`: a padded table of token indices [NB, Bmax] (-1 = padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batches:
    """tokens int64 [NB, Bmax]: token indices into the trace, -1 padded; ``mode``: decode | recorded."""

    tokens: np.ndarray
    mode: str
    dropped_tokens: int = 0

    @property
    def num_batches(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def valid(self) -> np.ndarray:
        return self.tokens >= 0

    @property
    def sizes(self) -> np.ndarray:
        return self.valid.sum(1)

    def row(self, b: int) -> np.ndarray:
        r = self.tokens[b]
        return r[r >= 0]


def decode_batches(seq_ids: np.ndarray, positions: np.ndarray, batch_size: int, seed: int) -> Batches:
    """Decode-like batches: each holds B tokens from B different sequences, like one decode step.

    Every step draws B distinct sequences that still have tokens (without replacement, with
    probability proportional to their remaining tokens, so long and short requests finish together
    and few tokens are left over) and takes the next token (by position) of each. Stops when fewer
    than B sequences have tokens left; those tokens are dropped (counted in ``dropped_tokens``).
    Seeded by ``seed``: the same inputs always give the same batches.
    """
    if batch_size < 1:
        raise ValueError(f"--batch must be >= 1, got {batch_size}")
    seq_ids = np.asarray(seq_ids)
    num_seqs = int(np.unique(seq_ids).size)
    if num_seqs < batch_size:
        raise ValueError(f"--batch {batch_size}: the trace has only {num_seqs} sequences; a decode-like batch "
                         "needs B tokens from B different sequences")
    order = np.lexsort((np.arange(seq_ids.size), positions, seq_ids))  # by sequence, then position
    uniq, starts, counts = np.unique(seq_ids[order], return_index=True, return_counts=True)
    remaining = counts.astype(np.int64).copy()
    cursor = starts.astype(np.int64).copy()
    rng = np.random.default_rng(seed)
    rows = []
    while True:
        alive = np.flatnonzero(remaining > 0)
        if alive.size < batch_size:
            break
        w = remaining[alive].astype(np.float64)
        pick = rng.choice(alive, size=batch_size, replace=False, p=w / w.sum())
        rows.append(order[cursor[pick]])
        cursor[pick] += 1
        remaining[pick] -= 1
    tokens = np.stack(rows) if rows else np.zeros((0, batch_size), dtype=np.int64)
    return Batches(tokens=tokens.astype(np.int64), mode="decode", dropped_tokens=int(remaining.sum()))


def recorded_batches(batch_ids: np.ndarray) -> Batches:
    """The recorded forward batches, in ascending batch id, tokens in trace order."""
    batch_ids = np.asarray(batch_ids)
    order = np.argsort(batch_ids, kind="stable")
    uniq, starts, counts = np.unique(batch_ids[order], return_index=True, return_counts=True)
    width = int(counts.max())
    tokens = np.full((uniq.size, width), -1, dtype=np.int64)
    col = np.arange(order.size) - np.repeat(starts, counts)
    tokens[np.repeat(np.arange(uniq.size), counts), col] = order
    return Batches(tokens=tokens, mode="recorded")
