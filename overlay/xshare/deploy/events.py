"""The launcher's record of what happened (``started``, ``healthy``, ``node_exit``, ``restart``, ...): a list of
events that other threads can wait on, for the launcher's status lines, for callers and for tests."""

from __future__ import annotations

import threading
import time
from typing import Any


class EventLog:
    """Events as dicts: ``type``, ``time`` (epoch seconds) and the event's details, in order."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._cv = threading.Condition()

    def record(self, kind: str, **details: Any) -> dict[str, Any]:
        ev = {"type": kind, "time": time.time(), **details}
        with self._cv:
            self.events.append(ev)
            self._cv.notify_all()
        return ev

    def wait_for(self, kind: str, timeout: float, count: int = 1, **match: Any) -> dict[str, Any]:
        """Wait until ``count`` events of type ``kind`` (with the given fields) happened; return the last."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                hits = [e for e in self.events if e["type"] == kind and all(e.get(k) == v for k, v in match.items())]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {kind} event #{count} {match or ''} in {timeout} s; events: {self.events}")
                self._cv.wait(left)
