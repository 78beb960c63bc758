"""The traffic of ``xshare bench soak`` (:mod:`xshare.bench.soak`): client threads sending greedy ``/generate``
requests and a changer thread sending config changes through the admin API.

The changes are drawn for the served model's :class:`Shape`: a random valid config (:func:`random_config`), an
enable/disable flip, or one of :func:`invalid_changes`. :class:`Traffic` holds the counts of requests and changes
and the last acknowledged config, the figures :func:`xshare.bench.soak.soak` reports.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from xshare._http import request

PROMPTS = [f"def {n}(a, b):\n    return" for n in ("add", "sub", "mul", "div", "load", "save", "read", "send")]


@dataclass(frozen=True)
class Shape:
    """The served model's MoE shape (what a random config is drawn for)."""

    num_experts: int
    top_k: int


def random_config(rng: random.Random, shape: Shape) -> dict[str, Any]:
    """A random config the served model accepts: a registered policy and random values of its knobs
    (:attr:`xshare.selection.registry.Policy.knobs`), validated locally against the model's shape."""
    from xshare.selection import SelectorConfig
    from xshare.selection.registry import all_policies, validate
    from xshare.selection.types import ModelShape

    e, k = shape.num_experts, shape.top_k
    model = ModelShape(num_experts=e, top_k=k)
    policies = all_policies()
    for _ in range(100):
        policy = rng.choice(policies)
        body: dict[str, Any] = {"policy": policy.name, "enabled": True}
        if "budget" in policy.knobs:
            body["budget"] = rng.randint(k, e) if rng.random() < 0.7 else round(rng.uniform(k / e, 1.0), 3)
        if "warmup_k" in policy.knobs:
            body["warmup_k"] = rng.randint(0, k)
        if "group_budget" in policy.knobs and rng.random() < 0.5:
            body["group_budget"] = rng.randint(k, e)
        if "gpu_cap" in policy.knobs and rng.random() < 0.5:
            body["gpu_cap"] = rng.randint(max(1, k), e)
        fields = {f: v for f, v in body.items() if f != "enabled"}
        try:
            config = SelectorConfig(**fields)
            validate(config, model)
            if isinstance(body.get("budget"), float) and config.budget_for(e) < k:
                continue
        except ValueError:
            continue
        return body
    raise RuntimeError("no valid random config found in 100 draws")


def invalid_changes(shape: Shape) -> list[tuple[str, str, Any]]:
    """(what, method, body) of changes the admin endpoint must refuse on this model."""
    e, k = shape.num_experts, shape.top_k
    return [
        ("unknown field", "PATCH", {"budgett": 8}),
        ("unknown policy", "PATCH", {"policy": "no_such_policy"}),
        ("budget above E", "PATCH", {"budget": e + 1}),
        ("budget below top_k", "PATCH", {"budget": max(k - 1, 0)}),
        ("budget 0", "PATCH", {"budget": 0}),
        ("budget a string", "PATCH", {"budget": "eight"}),
        ("negative warm-up", "PATCH", {"warmup_k": -1}),
        ("warm-up above top_k", "PATCH", {"warmup_k": k + 1}),
        ("budget 2**63", "PATCH", {"budget": 2**63}),
        ("gpu_cap 0", "PUT", {"policy": "xshare_ep", "budget": k, "gpu_cap": 0}),
        ("enabled null", "PATCH", {"enabled": None}),
        ("not an object", "PATCH", [1, 2, 3]),
    ]


class Traffic:
    """The shared state of one soak: the ``/generate`` counts, the first errors, the config changes sent and their
    outcomes, and the last config the admin endpoint acknowledged. Client threads and the changer update it under
    ``lock``."""

    def __init__(self, base_url: str, token: str, shape: Shape, max_new_tokens: int, rng: random.Random) -> None:
        self.base_url, self.token, self.shape, self.rng = base_url, token, shape, rng
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "completed": 0, "failed": 0, "truncated": 0}
        self.errors: list[str] = []
        self.changes = {"valid_sent": 0, "acknowledged": 0, "valid_refused": 0, "toggles": 0, "invalid_sent": 0,
                        "invalid_refused": 0, "invalid_accepted": 0, "admin_errors": 0}
        self.change_log: list[str] = []
        self.invalid = invalid_changes(shape)
        self.last_ack: dict[str, Any] = {}
        self.issued = 0

    # -- requests --------------------------------------------------------------------------------------------
    def one(self, i: int) -> None:
        """One greedy ``/generate`` request of ``max_new_tokens`` tokens, counted as completed, failed or truncated."""
        body = {"text": PROMPTS[i % len(PROMPTS)],
                "sampling_params": {"max_new_tokens": self.max_new_tokens, "temperature": 0, "ignore_eos": True}}
        try:
            status, reply = request(self.base_url + "/generate", "POST", body=body, timeout=600)
        except OSError as exc:
            status, reply = None, f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.counts["requests"] += 1
            if status != 200 or not isinstance(reply, dict):
                self.counts["failed"] += 1
                if len(self.errors) < 10:
                    self.errors.append(f"{status}: {str(reply)[:200]}")
                return
            meta = reply.get("meta_info") or {}
            reason = (meta.get("finish_reason") or {}).get("type")
            if meta.get("completion_tokens") != self.max_new_tokens or reason != "length":
                self.counts["truncated"] += 1
                if len(self.errors) < 10:
                    self.errors.append(f"truncated: {meta.get('completion_tokens')} tokens, finish {reason}")
                return
            self.counts["completed"] += 1

    def warm_up(self, clients: int) -> dict[str, int]:
        """Every client once, so the memory baseline is taken after the first allocations; returns the warm-up's
        counts and starts the soak's from zero."""
        warm = [threading.Thread(target=self.one, args=(i,)) for i in range(clients)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        warm_counts = dict(self.counts)
        for k in self.counts:
            self.counts[k] = 0
        return warm_counts

    def client(self, c: int, stop: threading.Event, deadline: float, max_requests: int) -> None:
        """One client thread: requests back to back until the deadline, ``stop`` or ``max_requests`` in all."""
        while not stop.is_set() and time.monotonic() < deadline:
            with self.lock:
                if self.issued >= max_requests:
                    return
                self.issued += 1
                i = self.issued
            self.one(c + i)

    # -- config changes --------------------------------------------------------------------------------------
    def draw_change(self) -> tuple[str, str, Any, str]:
        """(kind, method, body, what) of the next change: a random valid config, an enable/disable flip, or one of
        the invalid changes."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.55:
            return "valid", "PUT", random_config(rng, self.shape), "random config"
        if roll < 0.75:
            enabled = not bool(self.last_ack["config"].get("enabled", True))
            return "toggle", "PATCH", {"enabled": enabled}, f"enabled={enabled}"
        what, method, body = rng.choice(self.invalid)
        return "invalid", method, body, what

    def changer(self, stop: threading.Event, deadline: float, change_every: float) -> None:
        """The changer thread: a change every ``change_every`` seconds until ``stop`` or the deadline."""
        while not stop.wait(change_every):
            if time.monotonic() >= deadline:
                return
            kind, method, body, what = self.draw_change()
            try:
                status, reply = request(self.base_url + "/xshare/config", method, token=self.token, body=body,
                                        timeout=120)
            except OSError as exc:
                status, reply = None, str(exc)
            with self.lock:
                self.record_change(kind, what, body, status, reply)

    def record_change(self, kind: str, what: str, body: Any, status: int | None, reply: Any) -> None:
        """Count one change's outcome (acknowledged, refused, or an admin error) and note the unexpected ones."""
        changes = self.changes
        if kind == "invalid":
            changes["invalid_sent"] += 1
        else:
            changes["valid_sent"] += 1
            changes["toggles"] += kind == "toggle"
        if status == 200 and isinstance(reply, dict):
            self.last_ack.update(version=reply["version"], config=reply["config"])
            changes["acknowledged"] += 1
            if kind == "invalid":
                changes["invalid_accepted"] += 1
                self.change_log.append(f"invalid change accepted ({what}): {body}")
        elif status is not None and 400 <= status < 500:
            if kind == "invalid":
                changes["invalid_refused"] += 1
            else:
                changes["valid_refused"] += 1
                self.change_log.append(f"valid change refused ({what}) {status}: {str(reply)[:200]}")
        else:
            changes["admin_errors"] += 1
            self.change_log.append(f"{what}: {status} {str(reply)[:200]}")


def run_traffic(traffic: Traffic, clients: int, duration: float, change_every: float, max_requests: int) -> float:
    """The clients and the changer until the deadline or ``max_requests``; returns the seconds it took."""
    stop = threading.Event()
    deadline = time.monotonic() + duration
    t0 = time.monotonic()
    threads = [threading.Thread(target=traffic.client, args=(c, stop, deadline, max_requests), daemon=True)
               for c in range(clients)]
    ch = threading.Thread(target=traffic.changer, args=(stop, deadline, change_every), daemon=True)
    for t in threads:
        t.start()
    ch.start()
    for t in threads:
        t.join()
    stop.set()
    ch.join()
    return time.monotonic() - t0
