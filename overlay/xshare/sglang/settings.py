"""The plugin's settings, from ``XSHARE_*`` environment variables and an optional JSON file.

Every SGLang process inherits the launcher's environment, so the same settings reach every
scheduler (every TP/EP rank). ``XSHARE_CONFIG`` names a JSON object whose keys are the variable
names below without the prefix, in lower case (``{"enable": true, "policy": "xshare", "budget": 8}``);
an environment variable overrides the same key of the file.

| variable | meaning | default |
|---|---|---|
| XSHARE_ENABLE | 1/true/yes/on or 0/false/no/off | off |
| XSHARE_POLICY | a registered policy (``xshare.selection.available_policies()``) | xshare |
| XSHARE_BUDGET | experts per layer and batch: int >= 1, or a fraction in (0, 1] | 0.5 |
| XSHARE_WARMUP_K | every token keeps its top-k0 experts | 1 |
| XSHARE_GROUP_BUDGET | per-request budget (xshare_spec): int, fraction or none | none |
| XSHARE_GPU_CAP | per-GPU cap (xshare_ep): int or none | none |
| XSHARE_MIN_TOKENS / XSHARE_MAX_TOKENS | batch-size range where the policy applies | 1 / none |
| XSHARE_EXTRA | JSON object of policy knobs (e.g. Lynx's) | {} |
| XSHARE_APPLY_PREFILL | also select on prefill (extend) batches | off |
| XSHARE_DEEPEP_MODE | with an all-to-all MoE backend (DeepEP): local or global | local |
| XSHARE_STATS_DIR | directory for the scheduler's stats file | none |
| XSHARE_STATS_EVERY | write the stats file every N forwards | 16 |
| XSHARE_TRACE_DIR | directory for router-logit traces (recorder off when unset) | none |
| XSHARE_TRACE_MAX_TOKENS | stop recording after this many tokens (per process) | 65536 |
| XSHARE_TRACE_FLUSH_TOKENS | write a trace shard every N recorded tokens | 4096 |
| XSHARE_FAULT_INJECT | tests only: ``always`` or ``every:N`` raises inside the selector | none |
| XSHARE_SIM_GPUS | without SGLang EP: experts placed contiguously over N virtual GPUs (metrics, xshare_ep) | none |
| XSHARE_METRICS_FLUSH_EVERY | flush the device-side metric window to Prometheus every N forwards | 16 |

Bad values raise :class:`SettingError`, whose message names the variable (or the file and key).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xshare.selection import SelectorConfig

PREFIX = "XSHARE_"
CONFIG_ENV = "XSHARE_CONFIG"

# setting name -> kind; the environment variable is PREFIX + name.upper()
_SELECTOR_KEYS = ("policy", "budget", "warmup_k", "group_budget", "gpu_cap", "min_tokens", "max_tokens", "extra")
_PLUGIN_KEYS = ("enable", "apply_prefill", "deepep_mode", "stats_dir", "stats_every", "trace_dir",
                "trace_max_tokens", "trace_flush_tokens", "fault_inject", "sim_gpus", "metrics_flush_every",
                "cpu_kernel", "profile")
KEYS = _PLUGIN_KEYS + _SELECTOR_KEYS
DEEPEP_MODES = ("local", "global")
GLOBAL_MODE_POLICIES = ("topk", "xshare", "xshare_ep")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class SettingError(ValueError):
    """A bad setting; the message names the environment variable or the config file and key."""


@dataclass(frozen=True)
class PluginSettings:
    enabled: bool = False
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    apply_prefill: bool = False
    deepep_mode: str = "local"
    stats_dir: Path | None = None
    stats_every: int = 16
    trace_dir: Path | None = None
    trace_max_tokens: int = 65536
    trace_flush_tokens: int = 4096
    fault_inject: str | None = None  # None | 'always' | 'every:N'
    sim_gpus: int | None = None  # virtual GPUs of the contiguous placement used without SGLang EP
    metrics_flush_every: int = 16
    cpu_kernel: bool = True  # CPU tensors: the C fast path (xshare.selection.kernels.cpu) where it applies
    profile: bool = False  # time model forwards and the MoE blocks in them (host clock; see docs/sglang.md)

    def describe(self) -> str:
        s = self.selector
        return (f"policy={s.policy} budget={s.budget} warmup_k={s.warmup_k} group_budget={s.group_budget} "
                f"gpu_cap={s.gpu_cap} tokens=[{s.min_tokens}, {s.max_tokens}] prefill={self.apply_prefill} "
                f"deepep_mode={self.deepep_mode}")


def env_name(key: str) -> str:
    return PREFIX + key.upper()


def _where(key: str, origin: Mapping[str, str]) -> str:
    return origin.get(key, env_name(key))


def _parse_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SettingError(f"{where}={value!r}: expected one of 1/true/yes/on or 0/false/no/off")


def _parse_int(value: Any, where: str, *, minimum: int) -> int:
    if isinstance(value, bool):
        raise SettingError(f"{where}={value!r}: expected an integer >= {minimum}")
    try:
        n = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise SettingError(f"{where}={value!r}: expected an integer >= {minimum}") from None
    if n < minimum:
        raise SettingError(f"{where}={value!r}: expected an integer >= {minimum}")
    return n


def _parse_number(value: Any, where: str, *, optional: bool) -> int | float | None:
    """An int or float (file values keep their JSON type; strings: int if they look like one)."""
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "")):
        if optional:
            return None
        raise SettingError(f"{where} is required")
    if isinstance(value, bool):
        raise SettingError(f"{where}={value!r}: expected a number")
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise SettingError(f"{where}={value!r}: expected a number{' or none' if optional else ''}") from None


def _parse_optional_int(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SettingError(f"{where}={value!r}: expected an integer or none")
    try:
        return int(str(value).strip())
    except ValueError:
        raise SettingError(f"{where}={value!r}: expected an integer or none") from None


def _parse_extra(value: Any, where: str) -> dict[str, float]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise SettingError(f"{where}: not a JSON object ({exc})") from None
    if not isinstance(value, Mapping):
        raise SettingError(f"{where}={value!r}: expected a JSON object of numbers")
    return dict(value)


def _read_config_file(path: str) -> dict[str, Any]:
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


def _selector_config(raw: Mapping[str, Any], origin: Mapping[str, str]) -> SelectorConfig:
    parsed: dict[str, Any] = {}
    if "policy" in raw:
        parsed["policy"] = str(raw["policy"]).strip()
    if "budget" in raw:
        parsed["budget"] = _parse_number(raw["budget"], _where("budget", origin), optional=False)
    if "warmup_k" in raw:
        parsed["warmup_k"] = _parse_int(raw["warmup_k"], _where("warmup_k", origin), minimum=0)
    if "group_budget" in raw:
        parsed["group_budget"] = _parse_number(raw["group_budget"], _where("group_budget", origin), optional=True)
    if "gpu_cap" in raw:
        parsed["gpu_cap"] = _parse_optional_int(raw["gpu_cap"], _where("gpu_cap", origin))
    if "min_tokens" in raw:
        parsed["min_tokens"] = _parse_int(raw["min_tokens"], _where("min_tokens", origin), minimum=0)
    if "max_tokens" in raw:
        parsed["max_tokens"] = _parse_optional_int(raw["max_tokens"], _where("max_tokens", origin))
    if "extra" in raw:
        parsed["extra"] = _parse_extra(raw["extra"], _where("extra", origin))
    # Set one field at a time (in this order) so that a failure names the setting that caused it.
    config = SelectorConfig()
    if "policy" not in parsed:
        parsed = {"policy": config.policy, **parsed}
    for key in _SELECTOR_KEYS:
        if key not in parsed:
            continue
        try:
            config = config.replace(**{key: parsed[key]})
        except ValueError as exc:
            raise SettingError(f"{_where(key, origin)}={raw.get(key, parsed[key])!r}: {exc}") from None
    return config


def load_settings(environ: Mapping[str, str] | None = None) -> PluginSettings:
    """Read the plugin's settings (default: ``os.environ``). Raises :class:`SettingError`."""
    environ = os.environ if environ is None else environ
    raw, origin = _raw_settings(environ)
    enabled = _parse_bool(raw.get("enable", False), _where("enable", origin))
    selector = _selector_config(raw, origin)
    deepep_mode = str(raw.get("deepep_mode", "local")).strip().lower()
    if deepep_mode not in DEEPEP_MODES:
        raise SettingError(f"{_where('deepep_mode', origin)}={raw['deepep_mode']!r}: expected one of {DEEPEP_MODES}")
    if deepep_mode == "global" and selector.policy not in GLOBAL_MODE_POLICIES:
        raise SettingError(
            f"{_where('deepep_mode', origin)}=global: supported only with policies {', '.join(GLOBAL_MODE_POLICIES)} "
            f"(the policy is {selector.policy!r}, set by {_where('policy', origin)})"
        )
    fault = raw.get("fault_inject")
    if fault is not None:
        fault = str(fault).strip().lower() or None
    if fault is not None and fault != "always":
        ok = fault.startswith("every:") and fault[6:].isdigit() and int(fault[6:]) >= 1
        if not ok:
            raise SettingError(
                f"{_where('fault_inject', origin)}={raw['fault_inject']!r}: expected 'always' or 'every:N'")

    def path(key: str) -> Path | None:
        v = raw.get(key)
        return Path(str(v)) if v not in (None, "") else None

    return PluginSettings(
        enabled=enabled,
        selector=selector,
        apply_prefill=_parse_bool(raw.get("apply_prefill", False), _where("apply_prefill", origin)),
        deepep_mode=deepep_mode,
        stats_dir=path("stats_dir"),
        stats_every=_parse_int(raw.get("stats_every", 16), _where("stats_every", origin), minimum=1),
        trace_dir=path("trace_dir"),
        trace_max_tokens=_parse_int(raw.get("trace_max_tokens", 65536), _where("trace_max_tokens", origin), minimum=1),
        trace_flush_tokens=_parse_int(raw.get("trace_flush_tokens", 4096), _where("trace_flush_tokens", origin),
                                      minimum=1),
        fault_inject=fault,
        sim_gpus=_parse_optional_int(raw.get("sim_gpus"), _where("sim_gpus", origin)) if _positive_or_none(
            raw.get("sim_gpus"), _where("sim_gpus", origin)) else None,
        metrics_flush_every=_parse_int(raw.get("metrics_flush_every", 16), _where("metrics_flush_every", origin),
                                       minimum=1),
        cpu_kernel=_parse_bool(raw.get("cpu_kernel", True), _where("cpu_kernel", origin)),
        profile=_parse_bool(raw.get("profile", False), _where("profile", origin)),
    )


def _positive_or_none(value: Any, where: str) -> bool:
    """True if ``value`` is an integer >= 1; False if unset/none; raises otherwise."""
    n = _parse_optional_int(value, where)
    if n is None:
        return False
    if n < 1:
        raise SettingError(f"{where}={value!r}: expected an integer >= 1 or none")
    return True


def settings_env(values: Mapping[str, Any]) -> dict[str, str]:
    """Environment variables for ``values`` (setting name -> value; None values are skipped)."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise SettingError(f"unknown setting(s): {', '.join(unknown)}")
    out = {}
    for k, v in values.items():
        if v is None:
            continue
        if isinstance(v, bool):
            v = "1" if v else "0"
        elif isinstance(v, Mapping):
            v = json.dumps(dict(v))
        out[env_name(k)] = str(v)
    return out
