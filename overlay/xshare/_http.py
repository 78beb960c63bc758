"""JSON over HTTP with the standard library: the one request helper of ``xshare admin`` and the
server benchmark's client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def request(url: str, method: str, token: str | None = None, body: Any = None, timeout: float = 60.0, *,
            text: bool = False) -> tuple[int, Any]:
    """(HTTP status, reply): the parsed JSON reply (None when empty), or its text with ``text``.
    A bearer ``token`` authenticates; an error status returns its body (JSON if it parses, else
    text) instead of raising; unreachable servers raise ``urllib.error.URLError`` / ``OSError``."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (raw.decode() if text else json.loads(raw or b"null"))
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")
