"""The admin endpoint's pure parts, without a server: validation against the served model and the schema's value
ranges, the signed config message, what a rank does with a message (apply, refuse, go back), the persisted config
at start, the /set_internal_state guard and the access-log redaction."""

import asyncio
import json
import logging

import pytest

from xshare.selection import SelectorConfig
from xshare.selection.registry import check_for_model, validate
from xshare.selection.schema import INT_MAX
from xshare.selection.types import ModelShape
from xshare.sglang.admin import common
from xshare.sglang.admin.config import ConfigInvalid, build_config, config_of
from xshare.sglang.admin.guards import BodyLimit, RedactQuery, ReservedKeyGuard
from xshare.sglang.admin.scheduler import handle_message
from xshare.sglang.admin.store import STARTUP, AdminState
from xshare.sglang.settings import PluginSettings
from xshare.sglang.state import ProcessState

MODEL = ModelShape(num_experts=32, top_k=4, moe_layers=(1, 2, 3))


@pytest.mark.parametrize("changes, field", [
    ({"budget": 3}, "budget"), ({"budget": 33}, "budget"), ({"budget": 0.05}, "budget"),
    ({"warmup_k": 5}, "warmup_k"), ({"group_budget": 1000}, "group_budget"), ({"gpu_cap": 33}, "gpu_cap"),
])
def test_check_for_model_names_the_setting(changes, field):
    config = SelectorConfig(**changes)
    with pytest.raises(ValueError, match=rf"^{field}"):
        check_for_model(config, MODEL)
    validate(config)  # fine without a model: only the served model rules it out


def test_check_for_model_accepts_the_edges():
    for changes in ({"budget": 4}, {"budget": 32}, {"budget": 1.0}, {"warmup_k": 4}, {"group_budget": 32},
                    {"gpu_cap": 32}, {"max_tokens": INT_MAX}):
        check_for_model(SelectorConfig(**changes), MODEL)


@pytest.mark.parametrize("changes", [{"max_tokens": 2**63}, {"warmup_k": 2**63}, {"min_tokens": 2**31},
                                     {"gpu_cap": 2**63}, {"budget": 2**63}, {"group_budget": 2**40}])
def test_no_int_setting_reaches_int64_overflow(changes):
    with pytest.raises(ValueError, match=str(INT_MAX)):
        SelectorConfig(**changes)


@pytest.mark.parametrize("extra, match", [
    ({f"k{i}": 1.0 for i in range(65)}, "at most 64"), ({"x" * 65: 1.0}, "longer than"),
    ({"lynx_alpha": float("inf")}, "finite"), ({"lynx_alpha": 1e300}, "finite"),
])
def test_extra_is_bounded(extra, match):
    with pytest.raises(ValueError, match=match):
        SelectorConfig(policy="lynx", extra=extra)


def test_extra_only_for_the_policy_that_reads_it():
    validate(SelectorConfig(policy="lynx", extra={"lynx_alpha": 0.5}))
    with pytest.raises(ValueError, match="xshare reads no setting 'lynx_alpha'"):
        validate(SelectorConfig(policy="xshare", extra={"lynx_alpha": 0.5}))


def test_build_config_refuses_against_the_model():
    current = {**config_of(PluginSettings(enabled=True)), "enabled": True}
    with pytest.raises(ConfigInvalid) as err:
        build_config(current, {"warmup_k": 5}, replace_all=False, model=MODEL)
    assert err.value.field == "warmup_k"
    with pytest.raises(ConfigInvalid) as err:
        build_config(current, {"group_budget": 1000}, replace_all=False, model=MODEL)
    assert err.value.field == "group_budget"
    assert build_config(current, {}, replace_all=False, model=MODEL) == current  # a no-op stays one


# -- the config message --------------------------------------------------------------------------------------------
def test_message_round_trip_and_signature():
    text = common.encode_message(7, {"budget": 6}, "admin change", "k1")
    assert common.is_control_key(text) and common.is_reserved_key(text)
    assert common.decode_message(text, "k1", verify=True) == {"version": 7, "config": {"budget": 6},
                                                             "source": "admin change"}
    with pytest.raises(ValueError, match="bad signature"):
        common.decode_message(text, "k2", verify=True)
    with pytest.raises(ValueError, match="no admin channel key"):
        common.decode_message(text, "", verify=True)
    assert common.decode_message(text, "k2", verify=False)["version"] == 7  # a peer trusts its group's broadcast
    forged = text.replace('"budget":6', '"budget":4')
    with pytest.raises(ValueError, match="bad signature"):
        common.decode_message(forged, "k1", verify=True)
    for bad in ("xshare_config", "xshare_config 00", "xshare_config 00 [1]", "other 00 {}"):
        with pytest.raises(ValueError):
            common.decode_message(bad, "k1", verify=False)


def _runtime(**selector):
    rt = ProcessState(PluginSettings(enabled=True, selector=SelectorConfig(**selector)))
    rt.channel_key = "key"
    return rt


def _message(rt, version, **changes):
    config = {**config_of(rt.settings), **changes}
    return common.encode_message(version, config, "admin change", "key")


def test_a_rank_applies_a_signed_message():
    rt = _runtime(budget=8)
    assert handle_message(rt, _message(rt, 1, budget=6)) is None
    assert rt.version == 1 and rt.settings.selector.budget == 6 and rt.config_source == "admin change"
    assert rt.group_view[0]["ok"] and rt.group_view[0]["version"] == 1


@pytest.mark.parametrize("fault, words", [("refuse:budget=6", "refused by XSHARE_FAULT_ADMIN"),
                                          ("raise:budget=6", "apply failed")])
def test_a_refused_or_failing_change_leaves_the_rank_on_its_config(monkeypatch, fault, words):
    monkeypatch.setenv(common.FAULT_ENV, fault)
    rt = _runtime(budget=8)
    why = handle_message(rt, _message(rt, 1, budget=6))
    assert why is not None and words in why and "rank 0" in why
    assert rt.version == 0 and rt.settings.selector.budget == 8 and not rt.diverged
    assert rt.group_view[0]["ok"] is False and rt.group_view[0]["version"] == 0


def test_a_forged_or_invalid_message_changes_nothing():
    rt = _runtime(budget=8)
    forged = common.encode_message(1, {**config_of(rt.settings), "budget": 6}, "admin change", "other-key")
    assert "bad signature" in handle_message(rt, forged)
    bad = _message(rt, 2, warmup_k=-1)
    assert "invalid on this rank" in handle_message(rt, bad)
    assert rt.version == 0 and rt.settings.selector.budget == 8


# -- the persisted config at start ---------------------------------------------------------------------------------
def test_restart_reapplies_the_persisted_config_unless_the_startup_settings_changed(tmp_path):
    settings = PluginSettings(enabled=True, selector=SelectorConfig(budget=8))
    assert AdminState(settings, None).restored()[2] == STARTUP
    state = AdminState(settings, tmp_path)
    assert state.restored()[:3] == (0, state.startup, STARTUP)
    tuned = {**state.startup, "budget": 6}
    state.persist(5, tuned, "admin change")
    assert AdminState(settings, tmp_path).restored()[:3] == (5, tuned, "persisted")
    other = AdminState(PluginSettings(enabled=True, selector=SelectorConfig(budget=10)), tmp_path)
    version, config, source, why = other.restored()
    assert (version, config["budget"], source) == (6, 10, STARTUP) and "start-up settings win" in why
    (tmp_path / common.PERSIST_FILE).write_text("{broken")
    assert AdminState(settings, tmp_path).restored()[2] == STARTUP


def test_an_invalid_persisted_config_is_not_reapplied(tmp_path):
    """A persisted config is validated where it enters, at start, like a request's body: one the served model
    cannot take (or a hand-edited one no policy accepts) gives way to the start-up settings, naming the field."""
    settings = PluginSettings(enabled=True, selector=SelectorConfig(budget=8))
    state = AdminState(settings, tmp_path)
    state.persist(3, {**state.startup, "budget": 6}, "admin change")
    assert state.restored(MODEL)[:3] == (3, {**state.startup, "budget": 6}, "persisted")
    for bad, field in (({"budget": 33}, "budget"), ({"policy": "nope"}, "policy"), ({"warmup_k": -1}, "warmup_k")):
        state.persist(3, {**state.startup, **bad}, "admin change")
        version, config, source, why = state.restored(MODEL)
        assert (version, config, source) == (4, state.startup, STARTUP) and field in why, why


def test_persisting_into_an_unwritable_place_raises(tmp_path):
    (tmp_path / common.PERSIST_FILE).mkdir()
    with pytest.raises(OSError):
        AdminState(PluginSettings(), tmp_path).persist(1, {}, "admin change")


# -- the /set_internal_state guard and the access log --------------------------------------------------------------
def _asgi(guard, body):
    sent, reached = [], []

    async def app(scope, receive, send):
        reached.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(guard(app)({"type": "http", "path": "/set_internal_state"}, receive, send))
    return sent[0]["status"], reached


@pytest.mark.parametrize("key", ["xshare_config", "xshare_config_version", "XSHARE", "xshare_config 0 {}"])
def test_guard_refuses_xshare_keys(key):
    status, reached = _asgi(ReservedKeyGuard, json.dumps({"server_args": {key: 1}}).encode())
    assert status == 403 and not reached


def test_guard_passes_sglang_keys_with_their_body():
    body = json.dumps({"server_args": {"pp_max_micro_batch_size": 2}}).encode()
    assert _asgi(ReservedKeyGuard, body) == (200, [body])


def test_access_log_shows_no_query_string():
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', (
        "127.0.0.1:1", "GET", "/xshare/config?token=s3cret", "1.1", 401), None)
    RedactQuery().filter(record)
    assert "s3cret" not in record.getMessage() and "/xshare/config?<redacted>" in record.getMessage()


# -- the body size limit of the /xshare routes (the e2e test sends real multi-MB bodies) ---------------------------
def _limited(chunks, headers=()):
    """(status, what the app received, messages left unread) for a body sent as ``chunks`` to /xshare/config."""
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent, reached, refused = [], [], []

    async def app(scope, receive, send):
        message = {"more_body": True}
        while message["more_body"]:
            message = await receive()
            reached.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive():
        return pending.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/xshare/config", "headers": list(headers)}
    asyncio.run(BodyLimit(app, on_refused=lambda: refused.append(1))(scope, receive, send))
    return sent[0]["status"], reached, len(pending), len(refused)


def test_body_limit_hands_a_small_chunked_body_on_unchanged():
    chunks = [b'{"budget":', b" 8}"]
    assert _limited(chunks) == (200, chunks, 0, 0)


def test_body_limit_drains_an_oversized_chunked_body_then_answers_413():
    chunks = [b"x" * 4096] * (common.MAX_BODY_BYTES // 4096 + 8)
    assert _limited(chunks) == (413, [], 0, 1)  # every chunk read (none left), none reached the route


def test_body_limit_answers_an_announced_oversize_with_expect_at_once():
    headers = [(b"content-length", str(10**7).encode()), (b"expect", b"100-continue")]
    assert _limited([b"x" * 4096] * 3, headers) == (413, [], 3, 1)  # nothing read: the body is never asked for


def test_the_process_state_is_an_admin_target():
    """Admin reads and changes the process state only through AdminTarget's names; the state has every one of them."""
    from xshare.sglang.admin.target import AdminTarget

    rt = ProcessState(PluginSettings())
    assert isinstance(rt, AdminTarget)
    rt.mark_diverged()
    assert rt.diverged and not rt.switch_on()
    rt.mark_converged()
    rt.record_group_rank(3)
    rt.record_group_view([{"rank": 3}])
    assert not rt.diverged and rt.group_rank == 3 and rt.group_view == [{"rank": 3}]
