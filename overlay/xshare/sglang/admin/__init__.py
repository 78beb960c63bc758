"""The admin endpoint: read and change the selector's config of every scheduler rank while serving.

Routes on SGLang's own HTTP server (``sglang.srt.entrypoints.http_server.app``, added by the plugin's
``register()`` in the launcher process, which serves HTTP, before uvicorn starts):

* ``GET /xshare/config``: the config in force, its version and where it came from (start-up
  settings, persisted, admin change), and every rank's version and config;
* ``PUT /xshare/config`` (a whole config; fields left out take their defaults) and ``PATCH
  /xshare/config`` (only the fields given): validated against the served model, then applied on all
  ranks at a forward-batch boundary, all or none; a change that changes nothing is a no-op;
* ``POST /xshare/enable`` / ``POST /xshare/disable``;
* ``GET /xshare/stats``: each reporting rank's per-layer figures over its last metrics window.

Control path (no shared filesystem, no new IPC type): the HTTP process validates the request fully
and sends SGLang's own ``SetInternalStateReq`` carrying the whole config in one signed key
(:func:`~xshare.sglang.admin.common.encode_message`). SGLang fans it out to every DP rank and scheduler
TP rank 0 broadcasts it to its TP peers over the CPU group, across nodes; every rank handles it in its
event loop between forward batches (:mod:`xshare.sglang.admin.scheduler`): applies it (the config was
validated where it entered; a rank checks only its captured graphs and device knobs), and the ranks of
the group exchange their outcome, all or none. The HTTP side then reads every rank's state back through
``get_internal_state`` and answers 200 only when all ``tp x pp x dp`` ranks (SGLang's world size) are
on the new version; otherwise it sends the previous config again and answers 409 naming the rank and
why.

Modules: :mod:`~xshare.sglang.admin.common` (names, limits, the signed message),
:mod:`~xshare.sglang.admin.config` (the request model and the one validation of a change),
:mod:`~xshare.sglang.admin.store` (the config in force, persisted), :mod:`~xshare.sglang.admin.guards`
(body limit, ``/set_internal_state`` guard, access-log redaction), :mod:`~xshare.sglang.admin.http`
(authorization, routes, the change), :mod:`~xshare.sglang.admin.fanout` (to every rank and back),
:mod:`~xshare.sglang.admin.scheduler` (a rank's side) and :mod:`~xshare.sglang.admin.target` (what
that side needs of a scheduler's runtime).

SGLang's unauthenticated ``/set_internal_state`` cannot reach the config: the HTTP process refuses any
``xshare*`` key there (403), and the message source checks the signature made with a per-start key
that only the HTTP process and its schedulers hold (inherited through the environment; never logged,
on a command line or in server_args).

Persistence: with ``XSHARE_ADMIN_STATE_DIR`` the HTTP process keeps the config in force in
``config.json`` there and re-applies it at the next start, before serving, unless the start-up
settings changed meanwhile (then they win). Without it nothing is written anywhere.

Authentication: ``XSHARE_ADMIN_TOKEN`` or ``XSHARE_ADMIN_TOKEN_FILE`` (read at each request, so a
rotated Kubernetes Secret takes effect), ``Authorization: Bearer <token>`` compared with
:func:`hmac.compare_digest`; missing -> 401, wrong -> 403. Without a token every route answers 403
saying how to turn it on, unless ``XSHARE_ADMIN_ALLOW_UNAUTHENTICATED_LOCAL=1`` and the caller is a
loopback address.
"""

from xshare.sglang.admin.common import (
    ALLOW_LOCAL_ENV,
    CONTROL_KEY,
    GET_STATE_TARGET,
    MAX_BODY_BYTES,
    ON_IDLE_TARGET,
    STATE_DIR_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    UPDATE_HANDLERS_TARGET,
    admin_configured,
    state_dir,
)
from xshare.sglang.admin.config import (
    CONFIG_FIELDS,
    ConfigInvalid,
    ConfigUpdate,
    build_config,
    config_of,
    settings_from_config,
)
from xshare.sglang.admin.http import install_routes
from xshare.sglang.admin.scheduler import get_internal_state_hook, on_idle_hook, scheduler_setup, update_handlers_hook
from xshare.sglang.admin.store import AdminState

__all__ = [
    "ALLOW_LOCAL_ENV", "CONFIG_FIELDS", "CONTROL_KEY", "GET_STATE_TARGET", "MAX_BODY_BYTES", "ON_IDLE_TARGET",
    "STATE_DIR_ENV", "TOKEN_ENV", "TOKEN_FILE_ENV", "UPDATE_HANDLERS_TARGET", "AdminState", "ConfigInvalid",
    "ConfigUpdate", "admin_configured", "build_config", "config_of", "get_internal_state_hook", "install_routes",
    "on_idle_hook", "scheduler_setup", "settings_from_config", "state_dir", "update_handlers_hook",
]
