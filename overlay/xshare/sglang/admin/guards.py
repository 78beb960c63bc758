"""What stands in front of SGLang's app for the admin endpoint: the body size limit of the /xshare
routes, the guard that keeps SGLang's own unauthenticated ``/set_internal_state`` away from the
config, and the access-log filter that hides query strings. Data: an HTTP request's ASGI scope, its
body messages (``http.request``), the reply messages, and uvicorn's access-log records."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from xshare.sglang.admin.common import DRAIN_IDLE_S, DRAIN_MAX_BYTES, MAX_BODY_BYTES, is_reserved_key

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
TOO_LARGE = f"the body exceeds {MAX_BODY_BYTES} bytes (a config is a few hundred)"


async def send_json(send: Send, status: int, content: Any, *, close: bool = False) -> None:
    """One whole JSON reply (with ``Connection: close`` when ``close``)."""
    reply = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(reply)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": reply})


def replaying(messages: list[dict[str, Any]], receive: Receive) -> Receive:
    """A ``receive`` that gives ``messages`` (already read) again, then what ``receive`` gives."""
    pending = list(messages)

    async def replay() -> dict[str, Any]:
        return pending.pop(0) if pending else await receive()

    return replay


async def drain(receive: Receive, limit: int) -> None:
    """Read and discard what is left of a request's body: up to ``limit`` bytes, and only while it keeps
    coming (a pause of DRAIN_IDLE_S ends it). A reply sent while the client is still sending is lost to the
    reset of a connection closed on unread data; after the drain the client reads it."""
    seen = 0
    while seen <= limit:
        try:
            message = await asyncio.wait_for(receive(), DRAIN_IDLE_S)
        except TimeoutError:
            return
        if message.get("type") != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimit:
    """ASGI middleware: a request to an /xshare route whose body exceeds MAX_BODY_BYTES gets 413 and the
    connection closes, whoever sends it (before authorization: nothing of the body reaches a route).

    * ``Content-Length`` over the limit with ``Expect: 100-continue`` (curl): 413 at once, instead of the
      go-ahead, so the body is never sent;
    * without it (urllib and most clients send the whole body first): the body is drained (at most
      DRAIN_MAX_BYTES, while it keeps coming), then 413, so the client reads the reply instead of a reset;
    * no or a small ``Content-Length`` (a chunked body): the body is read up to the limit and handed on
      unchanged; past the limit the rest is drained and the answer is 413.
    """

    PREFIX = "/xshare/"

    def __init__(self, app: Any, on_refused: Callable[[], None] | None = None) -> None:
        self.app = app
        self.on_refused = on_refused

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or not scope.get("path", "").startswith(self.PREFIX):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").strip()
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            if b"100-continue" not in headers.get(b"expect", b"").lower():
                await drain(receive, DRAIN_MAX_BYTES)
            await self.too_large(send)
            return
        received = await self.read_within_limit(receive)
        if received is None:
            await drain(receive, DRAIN_MAX_BYTES)
            await self.too_large(send)
            return
        await self.app(scope, replaying(received, receive), send)

    @staticmethod
    async def read_within_limit(receive: Receive) -> list[dict[str, Any]] | None:
        """The body's messages as received, or None once they exceed MAX_BODY_BYTES."""
        messages, size, more = [], 0, True
        while more:
            message = await receive()
            messages.append(message)
            if message.get("type") != "http.request":
                break
            size += len(message.get("body", b""))
            if size > MAX_BODY_BYTES:
                return None
            more = message.get("more_body", False)
        return messages

    async def too_large(self, send: Send) -> None:
        if self.on_refused is not None:
            self.on_refused()
        await send_json(send, 413, {"detail": [{"loc": ["body"], "msg": TOO_LARGE, "type": "too_large"}]},
                        close=True)


# -- what keeps SGLang's own routes away from the config --------------------------------------------------
class ReservedKeyGuard:
    """ASGI middleware: SGLang's ``/set_internal_state`` (unauthenticated unless SGLang's
    ``--admin-api-key`` is set) answers 403 for any ``xshare*`` key; only the admin route sends those."""

    PATHS = ("/set_internal_state",)

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("path", "").rstrip("/") not in self.PATHS:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message)
            more = message.get("more_body", False) and message.get("type") == "http.request"
        body = b"".join(m.get("body", b"") for m in chunks)
        try:
            keys = list(((json.loads(body) or {}).get("server_args") or {}).keys())
        except (ValueError, AttributeError):
            keys = []
        if any(is_reserved_key(k) for k in keys):
            await send_json(send, 403, {"detail": "xshare settings change only through the authenticated "
                                                  "/xshare/config route"})
            return
        await self.app(scope, replaying(chunks, receive), send)


class RedactQuery(logging.Filter):
    """Access-log lines show no query string (a token sent as ``?token=...`` must not reach the log)."""

    _QUERY = re.compile(r"\?[^\s\"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(self._QUERY.sub("?<redacted>", a) if isinstance(a, str) else a
                                for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = self._QUERY.sub("?<redacted>", record.msg)
        return True


def redact_access_log() -> None:
    """Add :class:`RedactQuery` to uvicorn's access log (once)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuery) for f in logger.filters):
        logger.addFilter(RedactQuery())
