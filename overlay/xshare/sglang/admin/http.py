"""The admin endpoint's HTTP side: routes on SGLang's FastAPI app, bearer-token authorization, the
all-or-none fan-out of a change to every scheduler rank, the persisted config and what keeps
SGLang's own unauthenticated routes away from the selector's config (see :mod:`xshare.sglang.admin`)."""

# No ``from __future__ import annotations``: FastAPI reads the route handlers' annotations (Request,
# Depends) at run time, and those are imported inside AdminRoutes.add_to.
import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from xshare._io import write_json_atomic
from xshare.sglang.admin.common import (
    ALLOW_LOCAL_ENV,
    APPLY_TIMEOUT_S,
    CHANNEL_KEY_ENV,
    PERSIST_FILE,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    VIEW_KEY,
    allow_unauthenticated_local,
    encode_message,
    is_reserved_key,
    state_dir,
)
from xshare.sglang.admin.config import ConfigInvalid, ConfigUpdate, build_config, config_of
from xshare.sglang.admin.guards import BodyLimit
from xshare.sglang.model_shape import moe_layer_ids, moe_shape

log = logging.getLogger("xshare.sglang")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
STARTUP, PERSISTED, ADMIN = "start-up settings", "persisted", "admin change"


class AdminState:
    """The HTTP process's view: the config in force, its version and origin, the change lock, and where
    the config is persisted (``XSHARE_ADMIN_STATE_DIR``; None: not persisted)."""

    def __init__(self, settings: Any, directory: Path | None) -> None:
        self.settings = settings
        self.dir = directory
        self.startup = config_of(settings)  # the start-up settings' config
        self.version = 0
        self.config = dict(self.startup)
        self.source = STARTUP
        self.lock = asyncio.Lock()
        self.channel_key = os.environ.get(CHANNEL_KEY_ENV, "")
        self._counter: Any = None

    @property
    def persist_path(self) -> Path | None:
        return None if self.dir is None else self.dir / PERSIST_FILE

    def count(self, result: str) -> None:
        from xshare.sglang.metrics import METRICS, multiprocess_dir

        if multiprocess_dir() is None:
            return
        if self._counter is None:
            import prometheus_client as pc

            doc = METRICS["xshare:config_changes_total"][2]
            self._counter = pc.Counter("xshare:config_changes", doc, ("rank", "result"), registry=None)
        self._counter.labels("http", result).inc()

    # -- persistence ----------------------------------------------------------------------------------
    def persist(self, version: int, config: dict[str, Any], source: str) -> None:
        """Write the config in force (OSError when the location cannot take it)."""
        path = self.persist_path
        if path is not None:
            write_json_atomic(path, {"version": version, "config": config, "source": source,
                                     "startup": self.startup, "time": time.time()}, sort_keys=True)

    def restored(self) -> tuple[int, dict[str, Any], str, str]:
        """(version, config, source, why) to start with: the persisted config when it was made from the
        same start-up settings as this start, else the start-up settings."""
        path = self.persist_path
        if path is None:
            return 0, dict(self.startup), STARTUP, "no XSHARE_ADMIN_STATE_DIR: the config is not persisted"
        if not path.exists():
            return 0, dict(self.startup), STARTUP, f"nothing persisted in {path} yet"
        try:
            data = json.loads(path.read_text())
            version, config, startup = int(data["version"]), dict(data["config"]), dict(data["startup"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return 0, dict(self.startup), STARTUP, f"{path} is unreadable ({exc}): start-up settings"
        if startup != self.startup:
            return version + 1, dict(self.startup), STARTUP, (
                f"{path} was made from other start-up settings: the new start-up settings win")
        return version, config, PERSISTED, f"re-applied from {path}"


_STATE: AdminState | None = None


def _token() -> str | None:
    token = os.environ.get(TOKEN_ENV, "")
    if token:
        return token.strip()
    path = os.environ.get(TOKEN_FILE_ENV, "").strip()
    if path:
        try:
            text = Path(path).read_text().strip()
        except OSError as exc:
            log.error("xshare admin: cannot read %s=%s: %s", TOKEN_FILE_ENV, path, exc)
            return ""  # configured but unreadable: nobody is let in
        return text
    return None


def _tokenizer_manager() -> Any:
    from sglang.srt.entrypoints import http_server

    return http_server._global_state.tokenizer_manager


def _model_shape() -> Any:
    """The served model's :class:`~xshare.selection.types.ModelShape`, from the tokenizer manager's config."""
    from xshare.selection.types import ModelShape

    hf = getattr(getattr(_tokenizer_manager(), "model_config", None), "hf_text_config", None)
    top_k, e = moe_shape(hf)
    return ModelShape(num_experts=e, top_k=top_k, moe_layers=moe_layer_ids(hf)) if e and top_k else None


def expected_ranks() -> int:
    """The scheduler ranks of the whole group, from SGLang's own view of the world size."""
    from sglang.srt.server_args import compute_world_size

    sa = _tokenizer_manager().server_args
    return compute_world_size(dp_size=int(sa.dp_size or 1), tp_size=int(sa.tp_size or 1),
                              pp_size=int(sa.pp_size or 1))


async def group_state() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every rank's state, each reporting rank's last metrics summary), through SGLang's
    get_internal_state (every DP rank answers for its TP group)."""
    replies = await asyncio.wait_for(_tokenizer_manager().get_internal_state(), APPLY_TIMEOUT_S)
    ranks: dict[int, dict[str, Any]] = {}
    stats = []
    for reply in replies:
        part = (reply or {}).get(VIEW_KEY) or {}
        for r in part.get("ranks") or []:
            ranks[int(r["rank"])] = r
        if part.get("stats"):
            stats.append(part["stats"])
    return [ranks[k] for k in sorted(ranks)], sorted(stats, key=lambda s: s.get("rank", 0))


async def fan_out(state: AdminState, version: int, config: dict[str, Any], source: str) -> tuple[bool, str]:
    """Send one config to every rank (SGLang's control path) and check that every rank of the group
    is on it: (True, '') or (False, why, naming the rank)."""
    from sglang.srt.managers.io_struct import SetInternalStateReq

    key = encode_message(version, config, source, state.channel_key)
    try:
        replies = await asyncio.wait_for(
            _tokenizer_manager().set_internal_state(SetInternalStateReq(server_args={key: 1})), APPLY_TIMEOUT_S)
    except TimeoutError:
        return False, f"the schedulers did not answer within {APPLY_TIMEOUT_S:.0f} s"
    try:
        ranks, _ = await group_state()
    except TimeoutError:
        return False, f"the schedulers did not report their state within {APPLY_TIMEOUT_S:.0f} s"
    refused = [r for r in ranks if not r.get("ok", True)]
    if refused:
        return False, "; ".join(f"rank {r['rank']} ({r.get('node', '?')}) refused: {r.get('why')}" for r in refused)
    if not replies or not all(replies):
        return False, f"a scheduler group refused version {version} (replies {replies})"
    expected = expected_ranks()
    missing = sorted(set(range(expected)) - {int(r["rank"]) for r in ranks})
    if missing:
        return False, f"rank(s) {missing} of {expected} did not report"
    behind = [r["rank"] for r in ranks if r.get("version") != version or r.get("config") != config]
    if behind:
        return False, f"rank(s) {behind} are not on version {version}"
    return True, ""


class AdminRoutes:
    """The /xshare routes' handlers (bound to one :class:`AdminState`), added to SGLang's app by
    :func:`install_routes`."""

    def __init__(self, state: AdminState) -> None:
        self.state = state

    # -- authorization -----------------------------------------------------------------------------
    def authorize(self, request: Any) -> str:
        from fastapi import HTTPException

        state = self.state
        caller = request.client.host if request.client else "?"
        token = _token()
        if token is None:
            if allow_unauthenticated_local() and caller in _LOOPBACK:
                return caller
            state.count("forbidden")
            raise HTTPException(403, f"the xshare admin API is off: set {TOKEN_ENV} or {TOKEN_FILE_ENV} (or "
                                     f"{ALLOW_LOCAL_ENV}=1 for unauthenticated loopback callers)")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            state.count("unauthorized")
            raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        if not token or not hmac.compare_digest(given.strip().encode(), token.encode()):
            state.count("forbidden")
            raise HTTPException(403, "wrong admin token")
        return caller

    # -- replies -----------------------------------------------------------------------------------
    def invalid(self, exc: ConfigInvalid) -> Any:
        from fastapi.responses import JSONResponse

        self.state.count("invalid")
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": ["body", exc.field], "msg": exc.message[:500], "type": "value_error"}]})

    async def view(self) -> dict[str, Any]:
        state = self.state
        try:
            ranks, _ = await group_state()
            expected = expected_ranks()
        except TimeoutError:
            ranks, expected = [], -1
        consistent = len(ranks) == expected and all(
            r.get("version") == state.version and r.get("config") == state.config and r.get("selecting", True)
            for r in ranks)
        return {"version": state.version, "config": state.config, "source": state.source,
                "persisted_in": None if state.persist_path is None else str(state.persist_path),
                "ranks": ranks, "expected_ranks": expected, "consistent": consistent}

    async def parse_body(self, request: Any) -> dict[str, Any] | Any:
        """The validated fields of a PUT/PATCH body, or a 422 reply. Parsed here, not by FastAPI: SGLang's
        app turns request validation errors into 400s. The body is within MAX_BODY_BYTES (BodyLimit)."""
        from fastapi.responses import JSONResponse

        def refuse(status: int, msg: str, kind: str) -> Any:
            self.state.count("invalid")
            return JSONResponse(status_code=status, content={"detail": [{"loc": ["body"], "msg": msg, "type": kind}]})

        body = await request.body()
        try:
            raw = json.loads(bytes(body))
        except ValueError as exc:
            return refuse(422, f"not a JSON body: {str(exc)[:200]}", "json_invalid")
        try:
            return ConfigUpdate.model_validate(raw).model_dump(exclude_unset=True)
        except ValidationError as exc:
            self.state.count("invalid")
            errors = [{"loc": ["body", *e["loc"]], "msg": e["msg"][:500], "type": e["type"]} for e in exc.errors()]
            log.warning("xshare admin: config change refused: %s", json.dumps(errors)[:2000])
            return JSONResponse(status_code=422, content={"detail": errors})

    # -- the change: validate, persist, fan out to every rank, revert on failure ----------------------
    async def change(self, update: dict[str, Any], caller: str, *, replace_all: bool, what: str) -> Any:
        from fastapi.responses import JSONResponse

        state = self.state
        model = _model_shape()
        async with state.lock:
            old, old_version, old_source = dict(state.config), state.version, state.source
            try:
                new = build_config(old, update, replace_all=replace_all, model=model)
            except ConfigInvalid as exc:
                log.warning("xshare admin: %s from %s refused: %s", what, caller, str(exc)[:500])
                return self.invalid(exc)
            if new == old:  # a no-op change is a no-op: no new version, nothing sent
                return {**await self.view(), "changed": False}
            version = old_version + 1
            try:
                state.persist(version, new, ADMIN)
            except OSError as exc:
                state.count("failed")
                log.error("xshare admin: %s from %s refused: cannot persist the config in %s: %s", what, caller,
                          state.dir, exc)
                return JSONResponse(status_code=503, content={
                    "detail": f"cannot persist the config in {state.dir} ({type(exc).__name__}: {exc}); "
                              f"the config in force is unchanged", **await self.view()})
            ok, why = await fan_out(state, version, new, ADMIN)
            if not ok:
                back, why_back = await fan_out(state, old_version, old, old_source)
                try:
                    state.persist(old_version, old, old_source)
                except OSError as exc:
                    log.error("xshare admin: cannot persist the previous config again: %s", exc)
                state.count("reverted" if back else "failed")
                log.error("xshare admin: %s from %s failed (%s); every rank went back to v%d%s", what, caller, why,
                          old_version, "" if back else f" (the revert failed too: {why_back})")
                return JSONResponse(status_code=409, content={"detail": why, "reverted": back, **await self.view()})
            state.version, state.config, state.source = version, new, ADMIN
            state.count("applied")
            log.info("xshare admin: %s from %s: config v%d -> v%d: %s -> %s", what, caller, old_version, version,
                     json.dumps(old, sort_keys=True), json.dumps(new, sort_keys=True))
            return {**await self.view(), "changed": True}

    async def changed_by_body(self, request: Any, caller: str, *, replace_all: bool, what: str) -> Any:
        update = await self.parse_body(request)
        if not isinstance(update, dict):
            return update
        return await self.change(update, caller, replace_all=replace_all, what=what)

    async def start(self) -> None:
        """Before serving: put every rank on the persisted config (or the start-up settings), so ranks
        started with other settings (another node's environment) join the group's config."""
        state = self.state
        version, config, source, why = state.restored()
        async with state.lock:
            ok, failure = await fan_out(state, version, config, source)
            if not ok and source != STARTUP:
                log.error("xshare admin: the persisted config was refused (%s): start-up settings", failure)
                version, config, source = version + 1, dict(state.startup), STARTUP
                ok, failure = await fan_out(state, version, config, source)
            state.version, state.config, state.source = version, config, source
            if ok:
                with contextlib.suppress(OSError):
                    if state.persist_path is not None and source != PERSISTED:
                        state.persist(version, config, source)
                log.info("xshare admin: every rank on config v%d (%s; %s)", version, source, why)
            else:
                log.error("xshare admin: the ranks are not on one config at start (%s); GET /xshare/config shows "
                          "each rank", failure)

    # -- the routes --------------------------------------------------------------------------------
    def add_to(self, app: Any) -> None:
        from fastapi import Depends, Request

        def caller_of(request: Request) -> str:
            return self.authorize(request)

        async def get_config(caller: str = Depends(caller_of)) -> dict[str, Any]:
            return await self.view()

        async def put_config(request: Request, caller: str = Depends(caller_of)) -> Any:
            return await self.changed_by_body(request, caller, replace_all=True, what="PUT")

        async def patch_config(request: Request, caller: str = Depends(caller_of)) -> Any:
            return await self.changed_by_body(request, caller, replace_all=False, what="PATCH")

        async def enable(caller: str = Depends(caller_of)) -> Any:
            return await self.change({"enabled": True}, caller, replace_all=False, what="enable")

        async def disable(caller: str = Depends(caller_of)) -> Any:
            return await self.change({"enabled": False}, caller, replace_all=False, what="disable")

        async def get_stats(caller: str = Depends(caller_of)) -> dict[str, Any]:
            _, stats = await group_state()
            return {"version": self.state.version, "ranks": stats}

        tags = ["xshare"]
        app.add_api_route("/xshare/config", get_config, methods=["GET"], tags=tags,
                          summary="Every rank's effective selector config and version")
        body_schema = {"requestBody": {"required": True, "content": {"application/json": {
            "schema": ConfigUpdate.model_json_schema()}}}}
        app.add_api_route("/xshare/config", put_config, methods=["PUT"], tags=tags, openapi_extra=body_schema,
                          summary="Replace the selector config on all ranks (all or none)")
        app.add_api_route("/xshare/config", patch_config, methods=["PATCH"], tags=tags, openapi_extra=body_schema,
                          summary="Change some selector settings on all ranks (all or none)")
        app.add_api_route("/xshare/enable", enable, methods=["POST"], tags=tags, summary="Turn the selector on")
        app.add_api_route("/xshare/disable", disable, methods=["POST"], tags=tags, summary="Turn the selector off")
        app.add_api_route("/xshare/stats", get_stats, methods=["GET"], tags=tags,
                          summary="Each reporting rank's per-layer figures over its last metrics window")


# -- what keeps SGLang's own routes away from the config --------------------------------------------------
class ReservedKeyGuard:
    """ASGI middleware: SGLang's ``/set_internal_state`` (unauthenticated unless SGLang's
    ``--admin-api-key`` is set) answers 403 for any ``xshare*`` key; only the admin route sends those."""

    PATHS = ("/set_internal_state",)

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
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
            reply = json.dumps({"detail": "xshare settings change only through the authenticated /xshare/config"
                                          " route"}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(reply)).encode())]})
            await send({"type": "http.response.body", "body": reply})
            return
        pending = list(chunks)

        async def replay() -> Any:
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)


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


def _redact_access_log() -> None:
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuery) for f in logger.filters):
        logger.addFilter(RedactQuery())


def install_routes(settings: Any) -> None:
    """In the HTTP process, before the schedulers are spawned: the channel key they inherit, the
    /xshare routes, the /set_internal_state guard, the body size limit, the access-log redaction and
    the start-up sync."""
    global _STATE
    from sglang.srt.entrypoints import http_server

    if _STATE is not None:
        return
    os.environ[CHANNEL_KEY_ENV] = secrets.token_hex(32)  # a new one each start, inherited by the schedulers
    state = _STATE = AdminState(settings, state_dir())
    routes = AdminRoutes(state)
    app = http_server.app
    routes.add_to(app)
    app.add_middleware(ReservedKeyGuard)
    app.add_middleware(BodyLimit, on_refused=lambda: state.count("invalid"))
    _redact_access_log()
    original = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> Any:
        async with original(a) as inner:
            _redact_access_log()  # uvicorn configured its loggers by now
            try:
                await routes.start()
            except Exception as exc:  # noqa: BLE001 - the admin side never stops the server from serving
                log.error("xshare admin: start-up sync failed: %s", exc, exc_info=True)
            yield inner

    app.router.lifespan_context = lifespan
    log.info("xshare: admin routes on the HTTP server (/xshare/config, /xshare/stats, /xshare/enable|disable); "
             "config persisted in %s; auth: %s", state.persist_path or "(nowhere: XSHARE_ADMIN_STATE_DIR unset)",
             "bearer token" if _token() is not None else
             ("loopback without token" if allow_unauthenticated_local() else "off"))
