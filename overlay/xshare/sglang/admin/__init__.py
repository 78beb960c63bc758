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

from xshare.sglang.admin.common import (
    ALLOW_LOCAL_ENV,
    CONTROL_KEY,
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
from xshare.sglang.admin.http import AdminState, install_routes
from xshare.sglang.admin.scheduler import on_idle_hook, scheduler_setup, update_handlers_hook, write_rank_file

__all__ = [
    "ALLOW_LOCAL_ENV", "CONFIG_FIELDS", "CONTROL_KEY", "ON_IDLE_TARGET", "STATE_DIR_ENV", "TOKEN_ENV",
    "TOKEN_FILE_ENV", "UPDATE_HANDLERS_TARGET", "AdminState", "ConfigInvalid", "ConfigUpdate", "admin_configured",
    "build_config", "config_of", "install_routes", "on_idle_hook", "scheduler_setup", "settings_from_config",
    "state_dir", "update_handlers_hook", "write_rank_file",
]
