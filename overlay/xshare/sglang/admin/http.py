"""The admin endpoint's HTTP side: routes on SGLang's FastAPI app, bearer-token authorization, and
the all-or-none fan-out of a change to every scheduler rank (see :mod:`xshare.sglang.admin`)."""

# No ``from __future__ import annotations``: FastAPI reads the route handlers' annotations (Request,
# Depends) at run time, and those are imported inside AdminRoutes.add_to.
import asyncio
import glob
import hmac
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from xshare._io import write_json_atomic
from xshare.sglang.admin.common import (
    ALLOW_LOCAL_ENV,
    APPLY_TIMEOUT_S,
    CONTROL_KEY,
    STATE_DIR_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    allow_unauthenticated_local,
    state_dir,
)
from xshare.sglang.admin.config import ConfigInvalid, ConfigUpdate, build_config, config_of
from xshare.sglang.model_shape import moe_shape

log = logging.getLogger("xshare.sglang")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class AdminState:
    """The HTTP process's view: the current config and version, and the change lock."""

    def __init__(self, settings: Any, directory: Path) -> None:
        self.settings = settings
        self.dir = directory
        self.version = 0
        self.config = config_of(settings)
        self.lock = asyncio.Lock()
        self._counter: Any = None

    def count(self, result: str) -> None:
        from xshare.sglang.metrics import METRICS, multiprocess_dir

        if multiprocess_dir() is None:
            return
        if self._counter is None:
            import prometheus_client as pc

            doc = METRICS["xshare:config_changes_total"][2]
            self._counter = pc.Counter("xshare:config_changes", doc, ("rank", "result"), registry=None)
        self._counter.labels("http", result).inc()

    def ranks(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(glob.glob(str(self.dir / "rank-*.json"))):
            if path.endswith("-stats.json"):
                continue
            try:
                out.append(json.loads(Path(path).read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        return sorted(out, key=lambda r: r.get("rank", 0))

    def rank_stats(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(glob.glob(str(self.dir / "rank-*-stats.json"))):
            try:
                out.append(json.loads(Path(path).read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        return sorted(out, key=lambda r: r.get("rank", 0))


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


def _model_facts() -> tuple[int | None, int | None]:
    """(top_k, E) of the served model, from the tokenizer manager's model config."""
    from sglang.srt.entrypoints import http_server

    gs = getattr(http_server, "_global_state", None)
    hf = getattr(getattr(getattr(gs, "tokenizer_manager", None), "model_config", None), "hf_text_config", None)
    return moe_shape(hf)


class AdminRoutes:
    """The /xshare routes' handlers (bound to one :class:`AdminState`), added to SGLang's app by
    :func:`install_routes`. FastAPI imports stay inside the methods' module scope of use."""

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
            {"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}]})

    def view(self) -> dict[str, Any]:
        state = self.state
        ranks = state.ranks()
        consistent = bool(ranks) and all(r.get("version") == state.version and r.get("config") == state.config
                                         for r in ranks)
        return {"version": state.version, "config": state.config, "ranks": ranks, "consistent": consistent}

    async def parse_body(self, request: Any) -> dict[str, Any] | Any:
        """The validated fields of a PUT/PATCH body, or a 422 reply. Parsed here, not by FastAPI:
        SGLang's app turns request validation errors into 400s."""
        from fastapi.responses import JSONResponse

        try:
            raw = await request.json()
        except ValueError as exc:
            self.state.count("invalid")
            return JSONResponse(status_code=422, content={"detail": [
                {"loc": ["body"], "msg": f"not a JSON body: {exc}", "type": "json_invalid"}]})
        try:
            return ConfigUpdate.model_validate(raw).model_dump(exclude_unset=True)
        except ValidationError as exc:
            self.state.count("invalid")
            errors = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
            log.warning("xshare admin: config change refused: %s", errors)
            return JSONResponse(status_code=422, content={"detail": errors})

    # -- the change: validate, fan out to every rank, revert on failure ------------------------------
    async def fan_out(self, config: dict[str, Any], version: int) -> tuple[bool, str]:
        from sglang.srt.entrypoints import http_server
        from sglang.srt.managers.io_struct import SetInternalStateReq

        state = self.state
        write_json_atomic(state.dir / f"config-v{version}.json", {"version": version, "config": config})
        expected = {r.get("rank") for r in state.ranks()}
        tm = http_server._global_state.tokenizer_manager
        replies = await tm.set_internal_state(SetInternalStateReq(server_args={CONTROL_KEY: version}))
        if not replies or not all(replies):
            return False, f"a scheduler refused version {version} (replies {replies})"
        deadline = time.monotonic() + APPLY_TIMEOUT_S
        while True:
            ranks = state.ranks()
            behind = sorted(r.get("rank") for r in ranks if r.get("version") != version)
            if not behind and {r.get("rank") for r in ranks} >= expected:
                return True, ""
            if time.monotonic() > deadline:
                return False, f"rank(s) {behind} did not apply version {version} within {APPLY_TIMEOUT_S:.0f} s"
            await asyncio.sleep(0.05)

    async def change(self, update: dict[str, Any], caller: str, *, replace_all: bool, what: str) -> Any:
        from fastapi.responses import JSONResponse

        state = self.state
        top_k, num_experts = _model_facts()
        async with state.lock:
            old = dict(state.config)
            try:
                new = build_config(old, update, replace_all=replace_all, top_k=top_k, num_experts=num_experts)
            except ConfigInvalid as exc:
                log.warning("xshare admin: %s from %s refused: %s", what, caller, exc)
                return self.invalid(exc)
            version = state.version + 1
            ok, why = await self.fan_out(new, version)
            if not ok:
                revert = version + 1
                back, why_back = await self.fan_out(old, revert)
                state.version = revert
                state.count("reverted" if back else "failed")
                log.error("xshare admin: %s from %s failed (%s); reverted to the previous config as v%d%s", what,
                          caller, why, revert, "" if back else f" (revert failed too: {why_back})")
                return JSONResponse(status_code=409, content={"detail": why, "reverted": back, **self.view()})
            state.version, state.config = version, new
            state.count("applied")
            log.info("xshare admin: %s from %s: config v%d -> v%d: %s -> %s", what, caller, version - 1, version,
                     json.dumps(old, sort_keys=True), json.dumps(new, sort_keys=True))
            return self.view()

    async def changed_by_body(self, request: Any, caller: str, *, replace_all: bool, what: str) -> Any:
        update = await self.parse_body(request)
        if not isinstance(update, dict):
            return update
        return await self.change(update, caller, replace_all=replace_all, what=what)

    # -- the routes --------------------------------------------------------------------------------
    def add_to(self, app: Any) -> None:
        from fastapi import Depends, Request

        def caller_of(request: Request) -> str:
            return self.authorize(request)

        async def get_config(caller: str = Depends(caller_of)) -> dict[str, Any]:
            return self.view()

        async def put_config(request: Request, caller: str = Depends(caller_of)) -> Any:
            return await self.changed_by_body(request, caller, replace_all=True, what="PUT")

        async def patch_config(request: Request, caller: str = Depends(caller_of)) -> Any:
            return await self.changed_by_body(request, caller, replace_all=False, what="PATCH")

        async def enable(caller: str = Depends(caller_of)) -> Any:
            return await self.change({"enabled": True}, caller, replace_all=False, what="enable")

        async def disable(caller: str = Depends(caller_of)) -> Any:
            return await self.change({"enabled": False}, caller, replace_all=False, what="disable")

        async def get_stats(caller: str = Depends(caller_of)) -> dict[str, Any]:
            return {"version": self.state.version, "ranks": self.state.rank_stats()}

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
                          summary="Each rank's per-layer figures over its last metrics window")


def install_routes(settings: Any) -> None:
    """Add the /xshare routes to SGLang's FastAPI app and create the state directory (HTTP process)."""
    global _STATE
    from sglang.srt.entrypoints import http_server

    if _STATE is not None:
        return
    directory = state_dir()
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="xshare-admin-"))
        os.environ[STATE_DIR_ENV] = str(directory)  # inherited by the schedulers spawned next
    directory.mkdir(parents=True, exist_ok=True)
    state = _STATE = AdminState(settings, directory)
    AdminRoutes(state).add_to(http_server.app)
    log.info("xshare: admin routes on the HTTP server (/xshare/config, /xshare/stats, /xshare/enable|disable); "
             "state in %s; auth: %s", directory,
             "bearer token" if _token() is not None else
             ("loopback without token" if allow_unauthenticated_local() else "off"))
