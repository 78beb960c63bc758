"""The load generator: one batch of prompts from ``clients`` threads, in waves (one request per client per
wave; the next wave starts when the wave is answered), so every wave is one prefill then batched decode."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from xshare.bench.serve.client import Client


@dataclass
class BatchResult:
    texts: list[str]
    completion_tokens: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    wall_seconds: float = 0.0
    requests: int = 0
    verify_forwards: int = 0  # speculative decoding: verify forwards of the requests (meta_info spec_verify_ct)
    accepted_tokens: int = 0  # tokens those forwards produced (accepted drafts + one each)
    errors: list[str] = field(default_factory=list)

    @property
    def accept_length(self) -> float | None:
        """Tokens per verify forward (SGLang's acceptance length), None without speculative decoding."""
        return self.accepted_tokens / self.verify_forwards if self.verify_forwards else None

    @classmethod
    def pool(cls, batches: Sequence[BatchResult]) -> BatchResult:
        """Several rounds of the same prompts as one result (texts concatenated, counts summed)."""
        out = cls(texts=[t for b in batches for t in b.texts], errors=[e for b in batches for e in b.errors])
        for name in ("completion_tokens", "decode_tokens", "decode_seconds", "wall_seconds", "requests",
                     "verify_forwards", "accepted_tokens"):
            setattr(out, name, sum(getattr(b, name) for b in batches))
        return out


def run_waves(client: Client, prompts: Sequence[str], clients: int, max_new_tokens: int) -> BatchResult:
    """Send ``prompts`` from ``clients`` threads, one request per client per wave."""
    res = BatchResult(texts=[""] * len(prompts))
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            out = client.generate(prompts[i], max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - counted, reported, makes the run fail
            with lock:
                res.errors.append(f"{prompts[i]!r}: {exc}")
            return
        meta = out.get("meta_info", {})
        n = int(meta.get("completion_tokens", 0))
        dec = float(meta.get("e2e_latency", 0.0)) - float(meta.get("first_token_latency", 0.0))
        verify = int(meta.get("spec_verify_ct") or 0)
        with lock:
            res.verify_forwards += verify
            res.accepted_tokens += verify + int(meta.get("spec_num_correct_drafts") or 0)
            res.texts[i] = out["text"]
            res.completion_tokens += n
            res.requests += 1
            if n > 1 and dec > 0:
                res.decode_tokens += n - 1
                res.decode_seconds += dec

    with cf.ThreadPoolExecutor(clients) as ex:
        for start in range(0, len(prompts), clients):
            t0 = time.perf_counter()
            list(ex.map(one, range(start, min(start + clients, len(prompts)))))
            res.wall_seconds += time.perf_counter() - t0
    return res
