"""The plugin's settings, from ``XSHARE_*`` environment variables and an optional JSON file.

Every SGLang process inherits the launcher's environment, so the same settings reach every
scheduler (every TP/EP rank). ``XSHARE_CONFIG`` names a JSON object whose keys are the variable
names without the prefix, in lower case (``{"enable": true, "policy": "xshare", "budget": 8}``); an
environment variable overrides the same key of the file.

The settings are defined once: the selector's in :data:`xshare.selection.schema.SELECTOR_FIELDS`,
the plugin's own in :data:`PLUGIN_FIELDS` below; :func:`settings_table` renders both for the docs
(a test keeps docs/sglang.md equal to it). Bad values raise :class:`SettingError`, whose message
names the variable (or the file and key).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xshare.selection import SelectorConfig
from xshare.selection.backends.global_mode import global_policies
from xshare.selection.registry import get_policy, validated
from xshare.selection.schema import OPERATOR_FIELDS, Field, by_name, markdown_table

PREFIX = "XSHARE_"
CONFIG_ENV = "XSHARE_CONFIG"
DEEPEP_MODES = ("local", "global")
METRICS_DETAILS = ("group", "rank", "layer")
REPLICA_PLANS = ("eplb", "predictive")
# xshare.eval.predict's PLANNERS and DEFAULT_ALPHA (a test keeps them equal; settings import no numpy)
REPLICA_PLANNERS = ("eplb", "greedy")
REPLICA_ALPHA = 0.2


def _fault_check(value: str) -> str | None:
    if value == "always" or (value.startswith("every:") and value[6:].isdigit() and int(value[6:]) >= 1):
        return None
    return "expected 'always' or 'every:N'"


PLUGIN_FIELDS: tuple[Field, ...] = (
    Field("enable", "bool", False, "turn the selector on", scope="plugin"),
    Field("apply_prefill", "bool", False, "also select on prefill (extend) batches", scope="plugin"),
    Field("draft_layers", "bool", False, "speculative decoding: also select in the draft model's MoE layers (MTP / "
          "EAGLE draft workers; their forwards counted as `draft_decode`, `draft_extend`); off: SGLang routes them "
          "(skipped as `draft_layer`)", scope="plugin"),
    Field("deepep_mode", "choice", "local", "with an all-to-all MoE backend (DeepEP): per-rank sets (local) or "
          "one set per layer for the whole EP group (global)", choices=DEEPEP_MODES, scope="plugin"),
    Field("stats_dir", "path", None, "directory for the scheduler's stats file", optional=True, scope="plugin"),
    Field("stats_every", "int", 16, "write the stats file every N forwards", minimum=1, scope="plugin"),
    Field("trace_dir", "path", None, "directory for router-logit traces (recorder off when unset)", optional=True,
          scope="plugin"),
    Field("trace_max_tokens", "int", 65536, "stop recording after this many tokens (per process)", minimum=1,
          scope="plugin"),
    Field("trace_flush_tokens", "int", 4096, "write a trace shard every N recorded tokens", minimum=1,
          scope="plugin"),
    Field("fault_inject", "text", None, "tests only: `always` or `every:N` raises inside the selector",
          optional=True, scope="plugin", check=_fault_check),
    Field("sim_gpus", "int", None, "without SGLang EP: experts placed contiguously over N virtual GPUs "
          "(metrics, GPU-aware policies)", minimum=1, optional=True, scope="plugin"),
    Field("metrics_flush_every", "int", 16, "flush the device-side metric window to Prometheus every N forwards",
          minimum=1, scope="plugin"),
    Field("metrics_detail", "choice", "group",
          "Prometheus detail: `group` (routing distributions from scheduler rank 0, per-GPU gauges from the rank "
          "that owns the GPU, layers aggregated as `layer=\"all\"`), `rank` (every rank's distributions), "
          "`layer` (also per MoE layer); series counts in docs/observability.md",
          choices=METRICS_DETAILS, scope="plugin"),
    Field("cpu_kernel", "bool", True, "on CPU tensors, route with the C fast path where it applies",
          scope="plugin"),
    Field("profile", "bool", False, "time model forwards and their MoE blocks (host clock)", scope="plugin"),
    Field("require_coverage", "bool", False, "refuse to serve (stop the scheduler) when the selector is enabled "
          "but selects on no MoE layer after the first decode forward", scope="plugin"),
    Field("routed_topk", "bool", True, "with the selector on, make SGLang's `flashinfer_trtllm` runners (Blackwell) "
          "route through select_experts and their routed kernels, so the selector sees the routing",
          scope="plugin"),
    Field("replica_plan", "choice", "eplb", "with SGLang's `--enable-eplb`: each rebalance places replicas by "
          "SGLang's EPLB on the recorded window (`eplb`), or by the plugin's plan from a forecast of the load "
          "(`predictive`: an EWMA over the rebalance windows, docs/eval.md)", choices=REPLICA_PLANS, scope="plugin"),
    Field("replica_planner", "choice", "greedy", "`predictive` plans: `greedy` re-fills only the spare slots "
          "beside a fixed home placement, `eplb` runs EPLB on the forecast", choices=REPLICA_PLANNERS, scope="plugin"),
    Field("replica_alpha", "fraction", REPLICA_ALPHA, "`predictive` plans: weight of the newest rebalance window "
          "in the forecast (1: that window alone)", scope="plugin"),
)
FIELDS: tuple[Field, ...] = PLUGIN_FIELDS + OPERATOR_FIELDS
_BY_NAME = by_name(FIELDS)
KEYS = tuple(f.name for f in FIELDS)
_SELECTOR_KEYS = tuple(f.name for f in OPERATOR_FIELDS)


class SettingError(ValueError):
    """A bad setting; the message names the environment variable or the config file and key."""


def _default(name: str) -> Any:
    return _BY_NAME[name].default


@dataclass(frozen=True)
class PluginSettings:
    """The plugin's settings (defaults from :data:`PLUGIN_FIELDS`; a test keeps them equal)."""

    enabled: bool = _default("enable")
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    apply_prefill: bool = _default("apply_prefill")
    draft_layers: bool = _default("draft_layers")
    deepep_mode: str = _default("deepep_mode")
    stats_dir: Path | None = _default("stats_dir")
    stats_every: int = _default("stats_every")
    trace_dir: Path | None = _default("trace_dir")
    trace_max_tokens: int = _default("trace_max_tokens")
    trace_flush_tokens: int = _default("trace_flush_tokens")
    fault_inject: str | None = _default("fault_inject")  # None | 'always' | 'every:N'
    sim_gpus: int | None = _default("sim_gpus")
    metrics_flush_every: int = _default("metrics_flush_every")
    metrics_detail: str = _default("metrics_detail")
    cpu_kernel: bool = _default("cpu_kernel")
    profile: bool = _default("profile")
    require_coverage: bool = _default("require_coverage")
    routed_topk: bool = _default("routed_topk")
    replica_plan: str = _default("replica_plan")
    replica_planner: str = _default("replica_planner")
    replica_alpha: float = _default("replica_alpha")

    def describe(self) -> str:
        s = self.selector
        return (f"policy={s.policy} budget={s.budget} warmup_k={s.warmup_k} group_budget={s.group_budget} "
                f"gpu_cap={s.gpu_cap} tokens=[{s.min_tokens}, {s.max_tokens}] prefill={self.apply_prefill} "
                f"deepep_mode={self.deepep_mode}")


def env_name(key: str) -> str:
    return PREFIX + key.upper()


HOOK_ALL_ENV = "XSHARE_HOOK_ALL_PROCESSES"
# Variables read outside the settings (by the launcher-side plugin and the admin endpoint).
OTHER_VARIABLES = (
    (CONFIG_ENV, "path", "none", "JSON file of settings (keys: the names above in lower case, without the prefix)"),
    (HOOK_ALL_ENV, "bool", "off", "register the hooks in every SGLang process, not only the schedulers"),
    ("XSHARE_ADMIN_TOKEN", "text", "none", "bearer token of the admin endpoint (Admin endpoint below)"),
    ("XSHARE_ADMIN_TOKEN_FILE", "path", "none", "file holding that token (a Kubernetes Secret; read per request)"),
    ("XSHARE_ADMIN_ALLOW_UNAUTHENTICATED_LOCAL", "bool", "off", "admin endpoint without a token, loopback only"),
    ("XSHARE_ADMIN_STATE_DIR", "path", "none", "where the HTTP process persists the config in force (re-applied "
                                               "at the next start); none: not persisted, nothing written"),
)


def settings_table() -> str:
    """The settings table of the docs: every variable, its values, default and meaning (the table
    between the ``settings-table`` markers of docs/sglang.md; a test keeps them equal)."""
    rows = [f"| `{name}` | {kind} | {default} | {meaning} |" for name, kind, default, meaning in OTHER_VARIABLES]
    return markdown_table(PLUGIN_FIELDS + OPERATOR_FIELDS) + "\n" + "\n".join(rows)


def _where(key: str, origin: Mapping[str, str]) -> str:
    return origin.get(key, env_name(key))


def _read_config_file(path: str) -> dict[str, Any]:
    import json

    p = Path(path)
    if not p.is_file():
        raise SettingError(f"{CONFIG_ENV}={path!r}: no such file")
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SettingError(f"{CONFIG_ENV}={path!r}: not a valid JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise SettingError(f"{CONFIG_ENV}={path!r}: the file must hold a JSON object")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise SettingError(f"{CONFIG_ENV}={path!r}: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    return data


def _raw_settings(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merged raw values and, per key, where it came from (for error messages)."""
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    config_path = environ.get(CONFIG_ENV, "").strip()
    if config_path:
        for k, v in _read_config_file(config_path).items():
            raw[k] = v
            origin[k] = f"{CONFIG_ENV}={config_path} key {k!r}"
    for k in KEYS:
        name = env_name(k)
        if name in environ:
            raw[k] = environ[name]
            origin[k] = name
    return raw, origin


def _parse(key: str, raw: Mapping[str, Any], origin: Mapping[str, str]) -> Any:
    """The typed value of ``key`` (its default when unset); SettingError naming where it came from."""
    f = _BY_NAME[key]
    if key not in raw:
        return f.default
    try:
        return f.parse(raw[key])
    except ValueError as exc:
        raise SettingError(f"{_where(key, origin)}={raw[key]!r}: {exc}") from None


def _selector_config(raw: Mapping[str, Any], origin: Mapping[str, str]) -> SelectorConfig:
    parsed = {k: _parse(k, raw, origin) for k in _SELECTOR_KEYS if k in raw}
    # Set one field at a time (in schema order) so that a failure names the setting that caused it.
    config = SelectorConfig()
    for key in _SELECTOR_KEYS:
        if key not in parsed:
            continue
        try:
            config = validated(config.replace(**{key: parsed[key]}))
        except ValueError as exc:
            raise SettingError(f"{_where(key, origin)}={raw.get(key, parsed[key])!r}: {exc}") from None
    return config


def load_settings(environ: Mapping[str, str] | None = None) -> PluginSettings:
    """Read the plugin's settings (default: ``os.environ``). Raises :class:`SettingError`."""
    environ = os.environ if environ is None else environ
    raw, origin = _raw_settings(environ)
    values = {f.name: _parse(f.name, raw, origin) for f in PLUGIN_FIELDS}
    selector = _selector_config(raw, origin)
    if values["deepep_mode"] == "global" and not get_policy(selector.policy).global_stats:
        raise SettingError(
            f"{_where('deepep_mode', origin)}=global: supported only with policies {', '.join(global_policies())} "
            f"(the policy is {selector.policy!r}, set by {_where('policy', origin)})"
        )
    for key in ("stats_dir", "trace_dir"):
        values[key] = Path(values[key]) if values[key] else None
    values["enabled"] = values.pop("enable")
    return PluginSettings(selector=selector, **values)


def settings_env(values: Mapping[str, Any]) -> dict[str, str]:
    """Environment variables for ``values`` (setting name -> value; None values are skipped)."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise SettingError(f"unknown setting(s): {', '.join(unknown)}")
    out = {}
    for k, v in values.items():
        text = _BY_NAME[k].to_text(v)
        if text is not None:
            out[env_name(k)] = text
    return out
