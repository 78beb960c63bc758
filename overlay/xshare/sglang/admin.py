"""The admin endpoint: read and change the selector's config of every scheduler rank while serving.

Routes on SGLang's own HTTP server (``sglang.srt.entrypoints.http_server.app``, added by the plugin's
``register()`` in the launcher process, which serves HTTP, before uvicorn starts):

* ``GET /xshare/config``: every rank's effective config and version;
* ``PUT /xshare/config`` (a whole config; fields left out take their defaults) and ``PATCH
  /xshare/config`` (only the fields given): validated, then applied on all ranks at a forward-batch
  boundary, all or none; the reply holds the new config and version;
* ``POST /xshare/enable`` / ``POST /xshare/disable``;
* ``GET /xshare/stats``: each rank's per-layer figures over its last metrics window.

Control path (no new IPC type): the HTTP process validates the request fully, writes the new config
atomically to ``<state dir>/config-v<N>.json`` and sends SGLang's own ``SetInternalStateReq``
(``/set_internal_state``'s message, numeric values only) with ``{"xshare_config_version": N}``. SGLang
fans it out to every DP rank, and scheduler TP rank 0 broadcasts it to its TP peers; each scheduler
processes it in its event loop between forward batches, through the handler this module adds to
``SchedulerInternalStateController._update_handlers`` (an AFTER hook): ``validate`` reads and checks
the file, ``apply`` swaps the runtime's settings (:meth:`Runtime.set_config`, device knobs in place) and
rewrites the rank's ``rank-<r>.json``. The HTTP process then waits until every rank file reports N;
if a rank refused or did not answer, it sends the previous config again under a new version (revert)
and answers 409. The state directory (``XSHARE_ADMIN_STATE_DIR``) is created by the HTTP process in
``register()``, before the schedulers are spawned, so they inherit it.

Authentication: ``XSHARE_ADMIN_TOKEN`` or ``XSHARE_ADMIN_TOKEN_FILE`` (read at each request, so a
rotated Kubernetes Secret takes effect), ``Authorization: Bearer <token>`` compared with
:func:`hmac.compare_digest`; missing -> 401, wrong -> 403. Without a token every route answers 403
saying how to turn it on, unless ``XSHARE_ADMIN_ALLOW_UNAUTHENTICATED_LOCAL=1`` and the caller is a
loopback address.
"""

import asyncio
import glob
import hmac
import json
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from xshare.selection import SelectorConfig, available_policies
from xshare.sglang.stats import write_json_atomic

log = logging.getLogger("xshare.sglang")

STATE_DIR_ENV = "XSHARE_ADMIN_STATE_DIR"
TOKEN_ENV = "XSHARE_ADMIN_TOKEN"
TOKEN_FILE_ENV = "XSHARE_ADMIN_TOKEN_FILE"
ALLOW_LOCAL_ENV = "XSHARE_ADMIN_ALLOW_UNAUTHENTICATED_LOCAL"
CONTROL_KEY = "xshare_config_version"
UPDATE_HANDLERS_TARGET = ("sglang.srt.managers.scheduler_components.internal_state."
                          "SchedulerInternalStateController._update_handlers")
ON_IDLE_TARGET = "sglang.srt.managers.scheduler.Scheduler.on_idle"
CONFIG_FIELDS = ("policy", "budget", "warmup_k", "group_budget", "gpu_cap", "min_tokens", "max_tokens", "extra")
APPLY_TIMEOUT_S = 30.0
_TRUE = ("1", "true", "yes", "on")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def admin_configured(environ: Any = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get(TOKEN_ENV) or env.get(TOKEN_FILE_ENV)
                or env.get(ALLOW_LOCAL_ENV, "").strip().lower() in _TRUE)


def state_dir() -> Path | None:
    d = os.environ.get(STATE_DIR_ENV, "").strip()
    return Path(d) if d else None


# -- request bodies ---------------------------------------------------------------------------------
class ConfigUpdate(BaseModel):
    """A selector config (``PUT``: the whole config, ``PATCH``: some fields). Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool | None = Field(None, description="selector on/off")
    policy: StrictStr | None = Field(None, description="one of xshare.selection.available_policies()")
    budget: StrictInt | StrictFloat | None = Field(
        None, description="experts per layer and batch: an int in [top_k, E] or a fraction of E")
    warmup_k: StrictInt | None = Field(None, ge=0, description="every token keeps its top-k0 experts")
    group_budget: StrictInt | StrictFloat | None = Field(None, description="per-request budget (xshare_spec)")
    gpu_cap: StrictInt | None = Field(None, ge=1, description="per-GPU cap (xshare_ep)")
    min_tokens: StrictInt | None = Field(None, ge=0, description="smallest batch (rows) the policy applies to")
    max_tokens: StrictInt | None = Field(None, ge=1, description="largest batch (rows) the policy applies to")
    extra: dict[str, StrictInt | StrictFloat] | None = Field(None, description="policy knobs")


class ConfigInvalid(ValueError):
    def __init__(self, fieldname: str, message: str) -> None:
        super().__init__(f"{fieldname}: {message}")
        self.field = fieldname
        self.message = message


def build_config(current: dict[str, Any], update: dict[str, Any], *, replace_all: bool, top_k: int | None,
                 num_experts: int | None) -> dict[str, Any]:
    """The config after ``update`` (a dict of set fields), fully validated; raises :class:`ConfigInvalid`
    naming the field. ``current``: {"enabled", and the selector fields}."""
    base = {k: v for k, v in SelectorConfig().to_dict().items() if k in CONFIG_FIELDS} if replace_all else \
        {k: current[k] for k in CONFIG_FIELDS}
    enabled = update.get("enabled", current["enabled"])
    if enabled is None:
        raise ConfigInvalid("enabled", "must be true or false")
    policy = update.get("policy", base["policy"])
    if "policy" in update and policy is None:
        raise ConfigInvalid("policy", "must be given")
    if policy not in available_policies():
        raise ConfigInvalid("policy", f"unknown policy {policy!r}; available: {', '.join(available_policies())}")
    cfg = SelectorConfig(policy=policy)
    merged = {**base, **{k: v for k, v in update.items() if k in CONFIG_FIELDS}}
    if merged.get("budget") is None:
        raise ConfigInvalid("budget", "must be given")
    if merged.get("warmup_k") is None:
        raise ConfigInvalid("warmup_k", "must be given")
    if merged.get("min_tokens") is None:
        merged["min_tokens"] = 1
    if merged.get("extra") is None:
        merged["extra"] = {}
    for key in CONFIG_FIELDS[1:]:
        try:
            cfg = cfg.replace(**{key: merged[key]})
        except (ValueError, TypeError) as exc:
            raise ConfigInvalid(key, str(exc)) from None
    if num_experts:
        budget = cfg.budget
        resolved = budget if isinstance(budget, int) else cfg.budget_for(num_experts)
        low = top_k or 1
        if not (low <= resolved <= num_experts):
            raise ConfigInvalid("budget", f"{budget!r} is outside [top_k, E] = [{low}, {num_experts}] for this model")
    out = {k: v for k, v in cfg.to_dict().items() if k in CONFIG_FIELDS}
    out["enabled"] = bool(enabled)
    return out


def settings_from_config(settings: Any, config: dict[str, Any]) -> Any:
    """``settings`` (PluginSettings) with ``config``'s selector fields and on/off switch."""
    sel = settings.selector.to_dict()
    sel.update({k: config[k] for k in CONFIG_FIELDS})
    return replace(settings, enabled=bool(config["enabled"]), selector=SelectorConfig.from_dict(sel))


def config_of(settings: Any) -> dict[str, Any]:
    out = {k: v for k, v in settings.selector.to_dict().items() if k in CONFIG_FIELDS}
    out["enabled"] = bool(settings.enabled)
    return out


# -- scheduler side ---------------------------------------------------------------------------------
def write_rank_file(runtime: Any) -> None:
    d = state_dir()
    if d is None:
        return
    write_json_atomic(d / f"rank-{runtime.rank}.json", {"rank": runtime.rank, "pid": os.getpid(),
                                                       "version": runtime.version,
                                                       "config": config_of(runtime.settings), "time": time.time()})


def write_rank_stats(rank: int, summary: dict[str, Any]) -> None:
    d = state_dir()
    if d is not None:
        write_json_atomic(d / f"rank-{rank}-stats.json", {"rank": rank, "time": time.time(), **summary})


def _read_config_file(version: int) -> dict[str, Any]:
    d = state_dir()
    if d is None:
        raise ValueError(f"{STATE_DIR_ENV} is not set in this scheduler")
    path = d / f"config-v{int(version)}.json"
    data = json.loads(path.read_text())
    if int(data.get("version", -1)) != int(version):
        raise ValueError(f"{path}: version mismatch")
    return data["config"]


def update_handlers_hook(result: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER ``SchedulerInternalStateController._update_handlers``: adds ``xshare_config_version``."""
    from sglang.srt.managers.scheduler_components.internal_state import UpdateRejected, _UpdateHandler

    from xshare.sglang import runtime as rt_mod

    runtime = rt_mod.get()
    if runtime is None or not isinstance(result, dict):
        return None
    pending: dict[int, Any] = {}

    def validate(key: str, value: Any) -> None:
        try:
            new = settings_from_config(runtime.settings, _read_config_file(int(value)))
        except Exception as exc:  # noqa: BLE001 - any problem refuses the update on this rank
            if runtime.metrics is not None:
                runtime.metrics.config_change("rejected")
            raise UpdateRejected(f"xshare: config version {value} refused on rank {runtime.rank}: {exc}") from None
        pending[int(value)] = new

    def apply(key: str, value: Any) -> None:
        version = int(value)
        new = pending.pop(version)
        old = runtime.settings.describe()
        old_enabled = runtime.settings.enabled
        if runtime.observe:
            runtime.flush_metrics()  # the window so far belongs to the old config
        runtime.set_config(new, version)
        write_rank_file(runtime)
        if runtime.metrics is not None:
            runtime.metrics.config_change("applied")
        log.info("xshare: rank %d applied config v%d: enabled %s -> %s; %s -> %s", runtime.rank, version,
                 old_enabled, new.enabled, old, new.describe())
        return None

    result[CONTROL_KEY] = _UpdateHandler(validate, apply)
    return result


def on_idle_hook(result: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``Scheduler.on_idle``: flush a metrics window that has not been flushed yet (host check)."""
    from xshare.sglang import runtime as rt_mod

    runtime = rt_mod.get()
    if runtime is not None and runtime.observe and runtime.stats.forwards != runtime._last_flush:
        runtime.flush_metrics()
    return None


def scheduler_setup(runtime: Any) -> None:
    """In a scheduler process, once its runtime exists: the metrics exporter and the rank file."""
    from xshare.sglang import metrics

    rank = runtime.rank
    on_flush = (lambda summary: write_rank_stats(rank, summary)) if state_dir() is not None else None
    runtime.enable_observability(metrics.create(rank, on_flush=on_flush))
    write_rank_file(runtime)


# -- HTTP side ----------------------------------------------------------------------------------------
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
    e = k = None
    for name in ("num_experts", "n_routed_experts", "num_local_experts"):
        v = getattr(hf, name, None)
        if isinstance(v, int) and v > 0:
            e = v
            break
    for name in ("num_experts_per_tok", "moe_top_k", "top_k"):
        v = getattr(hf, name, None)
        if isinstance(v, int) and v > 0:
            k = v
            break
    return k, e


def install_routes(settings: Any) -> None:
    """Add the /xshare routes to SGLang's FastAPI app and create the state directory (HTTP process)."""
    global _STATE
    from fastapi import Depends, HTTPException, Request
    from fastapi.responses import JSONResponse
    from sglang.srt.entrypoints import http_server

    if _STATE is not None:
        return
    directory = state_dir()
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="xshare-admin-"))
        os.environ[STATE_DIR_ENV] = str(directory)  # inherited by the schedulers spawned next
    directory.mkdir(parents=True, exist_ok=True)
    state = _STATE = AdminState(settings, directory)
    app = http_server.app

    def authorize(request: Request) -> str:
        caller = request.client.host if request.client else "?"
        token = _token()
        if token is None:
            if os.environ.get(ALLOW_LOCAL_ENV, "").strip().lower() in _TRUE and caller in _LOOPBACK:
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

    def invalid(exc: ConfigInvalid) -> JSONResponse:
        state.count("invalid")
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}]})

    def view() -> dict[str, Any]:
        ranks = state.ranks()
        consistent = bool(ranks) and all(r.get("version") == state.version and r.get("config") == state.config
                                         for r in ranks)
        return {"version": state.version, "config": state.config, "ranks": ranks, "consistent": consistent}

    async def fan_out(config: dict[str, Any], version: int) -> tuple[bool, str]:
        from sglang.srt.managers.io_struct import SetInternalStateReq

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

    async def change(update: dict[str, Any], request: Request, caller: str, *, replace_all: bool,
                     what: str) -> Any:
        top_k, num_experts = _model_facts()
        async with state.lock:
            old = dict(state.config)
            try:
                new = build_config(old, update, replace_all=replace_all, top_k=top_k, num_experts=num_experts)
            except ConfigInvalid as exc:
                log.warning("xshare admin: %s from %s refused: %s", what, caller, exc)
                return invalid(exc)
            version = state.version + 1
            ok, why = await fan_out(new, version)
            if not ok:
                revert = version + 1
                back, why_back = await fan_out(old, revert)
                state.version = revert
                state.count("reverted" if back else "failed")
                log.error("xshare admin: %s from %s failed (%s); reverted to the previous config as v%d%s", what,
                          caller, why, revert, "" if back else f" (revert failed too: {why_back})")
                return JSONResponse(status_code=409, content={"detail": why, "reverted": back, **view()})
            state.version, state.config = version, new
            state.count("applied")
            log.info("xshare admin: %s from %s: config v%d -> v%d: %s -> %s", what, caller, version - 1, version,
                     json.dumps(old, sort_keys=True), json.dumps(new, sort_keys=True))
            return view()

    async def get_config(caller: str = Depends(authorize)) -> dict[str, Any]:
        return view()

    async def parse_body(request: Request) -> dict[str, Any] | JSONResponse:
        # Parsed here, not by FastAPI: SGLang's app turns request validation errors into 400s.
        try:
            raw = await request.json()
        except ValueError as exc:
            state.count("invalid")
            return JSONResponse(status_code=422, content={"detail": [
                {"loc": ["body"], "msg": f"not a JSON body: {exc}", "type": "json_invalid"}]})
        try:
            return ConfigUpdate.model_validate(raw).model_dump(exclude_unset=True)
        except ValidationError as exc:
            state.count("invalid")
            errors = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
            log.warning("xshare admin: config change refused: %s", errors)
            return JSONResponse(status_code=422, content={"detail": errors})

    async def put_config(request: Request, caller: str = Depends(authorize)) -> Any:
        update = await parse_body(request)
        if isinstance(update, JSONResponse):
            return update
        return await change(update, request, caller, replace_all=True, what="PUT")

    async def patch_config(request: Request, caller: str = Depends(authorize)) -> Any:
        update = await parse_body(request)
        if isinstance(update, JSONResponse):
            return update
        return await change(update, request, caller, replace_all=False, what="PATCH")

    async def enable(request: Request, caller: str = Depends(authorize)) -> Any:
        return await change({"enabled": True}, request, caller, replace_all=False, what="enable")

    async def disable(request: Request, caller: str = Depends(authorize)) -> Any:
        return await change({"enabled": False}, request, caller, replace_all=False, what="disable")

    async def get_stats(caller: str = Depends(authorize)) -> dict[str, Any]:
        return {"version": state.version, "ranks": state.rank_stats()}

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
    log.info("xshare: admin routes on the HTTP server (/xshare/config, /xshare/stats, /xshare/enable|disable); "
             "state in %s; auth: %s", directory,
             "bearer token" if _token() is not None else
             ("loopback without token" if os.environ.get(ALLOW_LOCAL_ENV, "").strip().lower() in _TRUE else "off"))
