"""The admin endpoint's config changes: the request model (derived from the one settings schema)
and the validation of a change against the served model, before anything is applied."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, create_model

from xshare.selection import SelectorConfig, available_policies
from xshare.selection.registry import validate
from xshare.selection.schema import OPERATOR_FIELDS
from xshare.selection.schema import Field as Setting
from xshare.selection.types import ModelShape
from xshare.sglang.settings import PluginSettings

CONFIG_FIELDS = tuple(f.name for f in OPERATOR_FIELDS)


def _annotation(f: Setting) -> Any:
    """The strict pydantic type of a setting (numbers are not coerced from strings or bools)."""
    number = StrictInt | StrictFloat
    if f.per_layer:  # one value, or one per MoE layer (a list, or a map layer id -> value with a default)
        one = number | None if f.optional else number
        return one | list[one] | dict[str, one]
    return {"policy": StrictStr, "count": number, "fraction": number, "int": StrictInt, "bool": StrictBool,
            "choice": StrictStr, "mapping": dict[str, number], "path": StrictStr, "text": StrictStr}[f.kind]


def _request_model() -> type[BaseModel]:
    fields: dict[str, Any] = {"enabled": (Optional[StrictBool], Field(None, description="selector on/off"))}  # noqa: UP045
    for f in OPERATOR_FIELDS:
        constraints = {"ge": f.minimum or 0, "le": f.int_max} if f.kind == "int" else {}
        fields[f.name] = (Optional[_annotation(f)], Field(None, description=f"{f.help} ({f.type_text})",  # noqa: UP045
                                                          **constraints))
    model = create_model("ConfigUpdate", __config__=ConfigDict(extra="forbid"), **fields)
    model.__doc__ = ("A selector config (PUT: the whole config, PATCH: some fields), from the settings schema. "
                     "Unknown fields are refused.")
    return model


ConfigUpdate = _request_model()


class ConfigInvalid(ValueError):
    def __init__(self, fieldname: str, message: str) -> None:
        super().__init__(f"{fieldname}: {message}")
        self.field = fieldname
        self.message = message


def build_config(current: dict[str, Any], update: dict[str, Any], *, replace_all: bool,
                 model: ModelShape | None) -> dict[str, Any]:
    """The config after ``update`` (a dict of set fields, as the request model parsed them), validated
    once: built into one :class:`~xshare.selection.SelectorConfig` (every field's own check) and checked
    by :func:`xshare.selection.registry.validate` against its policy and the served ``model``. Raises
    :class:`ConfigInvalid` naming the field. ``current``: {"enabled", and the selector fields}. What
    comes out is trusted from here on: the ranks apply it without checking it again."""
    enabled = update.get("enabled", current["enabled"])
    if enabled is None:
        raise ConfigInvalid("enabled", "must be true or false")
    merged = _merged_fields(current, update, replace_all=replace_all)
    try:
        cfg = SelectorConfig(**merged)
        validate(cfg, model)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        raise ConfigInvalid(_field_named(text), text) from None
    out = {k: v for k, v in cfg.to_dict().items() if k in CONFIG_FIELDS}
    out["enabled"] = bool(enabled)
    return out


def _merged_fields(current: dict[str, Any], update: dict[str, Any], *, replace_all: bool) -> dict[str, Any]:
    """The selector fields after ``update``: on the defaults (PUT) or on ``current`` (PATCH); a required
    field sent as null takes its default, except the policy and warmup_k, which must be given."""
    base = {k: v for k, v in SelectorConfig().to_dict().items() if k in CONFIG_FIELDS} if replace_all else \
        {k: current[k] for k in CONFIG_FIELDS}
    merged = {**base, **{k: v for k, v in update.items() if k in CONFIG_FIELDS}}
    if merged["policy"] is None:
        raise ConfigInvalid("policy", "must be given")
    if merged["policy"] not in available_policies():
        raise ConfigInvalid("policy", f"unknown policy {merged['policy']!r}; available: "
                                      f"{', '.join(available_policies())}")
    if merged.get("warmup_k") is None:
        raise ConfigInvalid("warmup_k", "must be given")
    for f in OPERATOR_FIELDS:
        if merged.get(f.name) is None and not f.optional:
            merged[f.name] = f.default
    return merged


def _field_named(text: str) -> str:
    """The setting a validation message is about (every message starts with its name), else "config"."""
    named = [f for f in CONFIG_FIELDS if text.startswith(f)]
    return max(named, key=len) if named else "config"


def settings_from_config(settings: PluginSettings, config: dict[str, Any]) -> PluginSettings:
    """``settings`` (PluginSettings) with ``config``'s selector fields and on/off switch."""
    sel = settings.selector.to_dict()
    sel.update({k: config[k] for k in CONFIG_FIELDS})
    return replace(settings, enabled=bool(config["enabled"]), selector=SelectorConfig.from_dict(sel))


def config_of(settings: PluginSettings) -> dict[str, Any]:
    """The admin view of ``settings``: {"enabled", and the selector fields}."""
    out = {k: v for k, v in settings.selector.to_dict().items() if k in CONFIG_FIELDS}
    out["enabled"] = bool(settings.enabled)
    return out


