"""Fault injection for tests (``XSHARE_FAULT_INJECT``): raise inside the selector on purpose, to
show that serving falls back to SGLang's routing and counts it."""

from __future__ import annotations


class InjectedFault(RuntimeError):
    """Raised inside the selector by XSHARE_FAULT_INJECT (tests)."""


class FaultInjector:
    """``mode``: None (off), 'always', or 'every:N' (every N-th selector call)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, mode: str | None) -> None:
        if mode is None:
            return
        self.calls += 1
        if mode == "always" or (mode.startswith("every:") and self.calls % int(mode[6:]) == 0):
            raise InjectedFault(f"XSHARE_FAULT_INJECT={mode} (call {self.calls})")
