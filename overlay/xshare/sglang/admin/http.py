"""The admin endpoint's HTTP side: the /xshare routes on SGLang's FastAPI app, bearer-token
authorization, the body of a change parsed into a validated config, the change itself (persisted, fanned
out to every rank, reverted on failure) and the start-up sync; :func:`install_routes` puts them, with the
guards of :mod:`xshare.sglang.admin.guards`, on SGLang's app (see :mod:`xshare.sglang.admin`). Data: an
HTTP request in, a JSON reply out; the config in force lives in :class:`~xshare.sglang.admin.store.AdminState`."""

# No ``from __future__ import annotations``: FastAPI reads the route handlers' annotations (Request,
# Depends) at run time, and those are imported inside AdminRoutes.add_to.
import contextlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from xshare.sglang.admin.common import (
    ALLOW_LOCAL_ENV,
    CHANNEL_KEY_ENV,
    LOOPBACK,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    allow_unauthenticated_local,
    state_dir,
)
from xshare.sglang.admin.config import ConfigInvalid, ConfigUpdate, build_config
from xshare.sglang.admin.fanout import expected_ranks, fan_out, group_state, served_model_shape
from xshare.sglang.admin.guards import BodyLimit, ReservedKeyGuard, redact_access_log
from xshare.sglang.admin.store import ADMIN, PERSISTED, STARTUP, AdminState
from xshare.sglang.settings import PluginSettings

log = logging.getLogger("xshare.sglang")


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
            if allow_unauthenticated_local() and caller in LOOPBACK:
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

        try:
            raw = json.loads(await request.body())
        except ValueError as exc:
            self.state.count("invalid")
            return JSONResponse(status_code=422, content={"detail": [
                {"loc": ["body"], "msg": f"not a JSON body: {str(exc)[:200]}", "type": "json_invalid"}]})
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
        model = served_model_shape()
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
        version, config, source, why = state.restored(served_model_shape())
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


def install_routes(settings: PluginSettings) -> None:
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
    redact_access_log()
    original = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> Any:
        async with original(a) as inner:
            redact_access_log()  # uvicorn configured its loggers by now
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
