"""One definition of every setting: its type, range, default, description and names.

A :class:`Field` says what a setting is once; everything that reads or shows settings derives from
it: :class:`~xshare.selection.config.SelectorConfig`'s checks, the plugin's environment and file
settings (``XSHARE_*``), the admin endpoint's request model, the ``--xshare-*`` / ``xshare admin`` /
``xshare eval`` options and the settings table of the docs. The selector's own fields are
:data:`SELECTOR_FIELDS`; the serving plugin adds its process settings with the same type.

Kinds (``Field.kind``):

    policy   a registered policy name (checked against the registry where a config is used)
    count    an int in [1, INT_MAX], or a fraction of the layer's experts in (0, 1]
    fraction a number in (0, 1] (a share, e.g. of the batch's gate mass)
    int      an int in [``minimum``, ``maximum``] (``maximum`` defaults to INT_MAX)
    bool     true/false (text: 1/true/yes/on, 0/false/no/off)
    choice   one of ``choices``
    mapping  a JSON object of str -> finite number (at most MAPPING_MAX_KEYS keys)
    path     a filesystem path (text)
    text     free text, checked by ``check`` when given

``optional`` fields also take None (text: ``none`` / empty). ``per_layer`` fields (the budget and the
target mass) also take one value per MoE layer: a list (the i-th value for the i-th MoE layer, in
layer order), or a map ``{"default": v, "<layer id>": v, ...}`` (decoder layer ids; layers not named
take ``default``, else the field's default). Text: the JSON of either. Which layer ids exist is
checked against the served model (:func:`xshare.selection.registry.check_for_model`). Pure Python:
no torch, no SGLang.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "XSHARE_"
TRUE_TEXT = ("1", "true", "yes", "on")
FALSE_TEXT = ("0", "false", "no", "off", "")
KINDS = ("policy", "count", "fraction", "int", "bool", "choice", "mapping", "path", "text")
# The largest int any int or count setting takes (unless its Field says less): far above any model's
# expert count or batch, and far below int64, so no value can overflow a device tensor or a C call.
INT_MAX = 2**31 - 1
# A mapping setting (``extra``) holds at most this many keys of at most MAPPING_KEY_MAX characters.
MAPPING_MAX_KEYS = 64
MAPPING_KEY_MAX = 64
# Where a field's value comes from: the operator (settings, admin, CLI) or the served layer.
SCOPES = ("selector", "layer", "plugin")


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_bool_text(value: Any) -> bool | None:
    """True / False for a truthy / falsy value or text (1/true/yes/on, 0/false/no/off, empty); None
    for anything else. The one parser of on/off text in the project."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_TEXT:
        return True
    if text in FALSE_TEXT:
        return False
    return None


def parse_count(text: str, name: str = "budget") -> int | float:
    """A count written as text (a CLI flag, an environment variable): an int >= 1, or a fraction of
    E in (0, 1]. The one budget parser of the project.

    Raises ValueError whose message starts with ``name`` and the text.
    """
    try:
        count = int(text)
    except ValueError:
        try:
            fraction = float(text)
        except ValueError:
            raise ValueError(f"{name} {text!r}: expected an int >= 1 or a fraction in (0, 1]") from None
        if not 0 < fraction <= 1:  # also rejects NaN
            raise ValueError(f"{name} {text}: a fraction must be in (0, 1]") from None
        return fraction
    if count < 1:
        raise ValueError(f"{name} {text}: must be >= 1")
    return count


def parse_fraction(text: str, name: str) -> float:
    """A share written as text: a number in (0, 1]. Raises ValueError naming ``name``."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r}: expected a number in (0, 1]") from None
    check_fraction(name, value, optional=False)
    return value


def check_fraction(name: str, value: object, *, optional: bool) -> None:
    """ValueError naming ``name`` unless ``value`` is a real number in (0, 1] (or None)."""
    if value is None and optional:
        return
    if not is_real(value):
        raise ValueError(f"{name} must be a number in (0, 1], got {type(value).__name__}")
    if not (0.0 < float(value) <= 1.0) or math.isnan(float(value)):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def check_count(name: str, value: object, *, optional: bool) -> None:
    """ValueError naming ``name`` unless ``value`` is an int >= 1 or a float in (0, 1] (or None)."""
    if value is None and optional:
        return
    if is_int(value):
        if not 1 <= value <= INT_MAX:
            raise ValueError(f"{name} must be an int in [1, {INT_MAX}] or a float in (0, 1], got {value!r}")
        return
    if isinstance(value, float):
        if not (0.0 < value <= 1.0) or math.isnan(value):
            raise ValueError(f"{name} as a fraction of the experts must be in (0, 1], got {value!r}")
        return
    raise ValueError(f"{name} must be an int >= 1 or a float in (0, 1], got {type(value).__name__}")


@dataclass(frozen=True)
class Field:
    """One setting. ``env`` / ``flag`` are its environment variable and command-line option."""

    name: str
    kind: str
    default: Any
    help: str
    minimum: int | None = None
    maximum: int | None = None  # int kind: the largest value (None: INT_MAX)
    optional: bool = False
    choices: tuple[str, ...] = ()
    scope: str = "selector"
    device: bool = False  # held in a device tensor (SelectorKnobs): changes reach captured CUDA graphs
    sweep: bool = False  # a per-policy knob that evaluations and benchmarks vary
    check: Callable[[Any], str | None] | None = None  # extra value check: an error message or None
    per_layer: bool = False  # also one value per MoE layer: a list, or a map {"default": v, "<layer>": v}

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"field {self.name}: kind {self.kind!r} not in {KINDS}")
        if self.scope not in SCOPES:
            raise ValueError(f"field {self.name}: scope {self.scope!r} not in {SCOPES}")

    @property
    def int_max(self) -> int:
        """The largest value of an int or count setting."""
        return INT_MAX if self.maximum is None else self.maximum

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def type_text(self) -> str:
        """How the value is written, for help texts and the docs' table."""
        text = {
            "policy": "policy name", "count": "int >= 1 or fraction in (0, 1]", "bool": "bool",
            "fraction": "number in (0, 1]",
            "choice": " / ".join(self.choices), "mapping": "JSON object", "path": "path", "text": "text",
            "int": f"int >= {self.minimum if self.minimum is not None else 0}",
        }[self.kind]
        text += " or none" if self.optional else ""
        return text + (", or per MoE layer: a JSON list or {\"default\": v, \"<layer>\": v}" if self.per_layer else "")

    # -- values ------------------------------------------------------------------------------------
    def validate(self, value: Any) -> None:
        """ValueError naming the field unless ``value`` (already typed) is valid for it."""
        if self.per_layer and isinstance(value, (list, tuple, Mapping)):
            for key, v in layer_items(self.name, value):
                dataclasses.replace(self, name=f"{self.name}[{key}]", per_layer=False).validate(v)
            return
        if value is None:
            if self.optional:
                return
            raise ValueError(f"{self.name} must be given ({self.type_text})")
        if self.kind == "count":
            check_count(self.name, value, optional=self.optional)
        elif self.kind == "fraction":
            check_fraction(self.name, value, optional=self.optional)
        elif self.kind == "int":
            low = 0 if self.minimum is None else self.minimum
            if not is_int(value) or value < low:
                raise ValueError(f"{self.name} must be an int >= {low}{' or None' if self.optional else ''}, "
                                 f"got {value!r}")
            if value > self.int_max:
                raise ValueError(f"{self.name} must be an int <= {self.int_max}, got {value!r}")
        elif self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be a bool, got {value!r}")
        elif self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{self.name} must be one of {self.choices}, got {value!r}")
        elif self.kind in ("policy", "path", "text"):
            if not isinstance(value, str):
                raise ValueError(f"{self.name} must be a string, got {type(value).__name__}")
        elif self.kind == "mapping":
            if not isinstance(value, Mapping):
                raise ValueError(f"{self.name} must be a mapping of str to number, got {type(value).__name__}")
            if len(value) > MAPPING_MAX_KEYS:
                raise ValueError(f"{self.name} holds {len(value)} keys; at most {MAPPING_MAX_KEYS}")
            for k, v in value.items():
                if not isinstance(k, str) or not is_real(v):
                    raise ValueError(f"{self.name}[{k!r:.80}] must map a str to a number, got {v!r:.40}")
                if len(k) > MAPPING_KEY_MAX:
                    raise ValueError(f"{self.name}: key {k[:MAPPING_KEY_MAX]!r}... is longer than "
                                     f"{MAPPING_KEY_MAX} characters")
                if not math.isfinite(v) or abs(v) > INT_MAX:
                    raise ValueError(f"{self.name}[{k!r}] must be a finite number of magnitude <= {INT_MAX}, "
                                     f"got {v!r}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise ValueError(f"{self.name}: {problem}")

    def parse(self, value: Any) -> Any:
        """The typed value of ``value`` as an environment variable, a config file or a CLI gives it
        (text, or a JSON value), validated. Raises ValueError (the caller names the source)."""
        if isinstance(value, str):
            text = value.strip()
            if self.optional and text.lower() in ("none", "null", ""):
                return None
            if self.per_layer and text[:1] in ("[", "{"):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{self.name}: not a JSON list or object ({exc})") from None
                self.validate(value)
                return plain_layers(value)
            value = self._from_text(text)
        elif self.per_layer and isinstance(value, (list, tuple, Mapping)):
            self.validate(value)
            return plain_layers(value)
        elif self.kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif self.kind == "fraction" and is_real(value):
            value = float(value)
        elif self.kind == "path" and value is not None:
            value = str(value)
        self.validate(value)
        return value

    def _from_text(self, text: str) -> Any:
        if self.kind == "count":
            return parse_count(text, self.name)
        if self.kind == "fraction":
            return parse_fraction(text, self.name)
        if self.kind == "int":
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"expected {self.type_text}") from None
        if self.kind == "bool":
            b = parse_bool_text(text)
            if b is None:
                raise ValueError("expected one of 1/true/yes/on or 0/false/no/off")
            return b
        if self.kind == "choice":
            return text.lower()
        if self.kind == "mapping":
            try:
                data = json.loads(text) if text else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON object ({exc})") from None
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object of numbers")
            return data
        return text

    def to_text(self, value: Any) -> str | None:
        """``value`` as an environment variable holds it (None: unset)."""
        if value is None:
            return None
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, Mapping):
            return json.dumps(dict(value))
        if isinstance(value, (list, tuple)):
            return json.dumps(list(value))
        return str(value)


DEFAULT_KEY = "default"


def layer_items(name: str, value: Sequence[Any] | Mapping[Any, Any]) -> list[tuple[str, Any]]:
    """(key, value) pairs of a per-layer value: list positions, or the map's keys ("default" or a
    layer id >= 0, as text). ValueError naming ``name`` for an empty list or a bad key."""
    if isinstance(value, Mapping):
        out = []
        for k, v in value.items():
            key = str(k).strip() if not isinstance(k, bool) else ""
            if key != DEFAULT_KEY and not (key.isdigit() and (is_int(k) or isinstance(k, str))):
                raise ValueError(f"{name}: per-layer keys are 'default' or a layer id >= 0, got {k!r}")
            out.append((key, v))
        return out
    if not value:
        raise ValueError(f"{name}: a per-layer list needs one value per MoE layer, got an empty list")
    return [(str(i), v) for i, v in enumerate(value)]


def plain_layers(value: Sequence[Any] | Mapping[Any, Any]) -> list[Any] | dict[str, Any]:
    """A per-layer value as JSON holds it (what a parser returns): a list, or a dict with text keys."""
    if isinstance(value, Mapping):
        return {str(k).strip(): v for k, v in value.items()}
    return list(value)


def freeze_layers(value: Sequence[Any] | Mapping[Any, Any]) -> tuple[Any, ...] | Mapping[str, Any]:
    """A per-layer value as the config holds it: a tuple, or a read-only map with text keys."""
    from types import MappingProxyType

    if isinstance(value, Mapping):
        return MappingProxyType({str(k).strip(): v for k, v in value.items()})
    return tuple(value)


def by_name(fields: Sequence[Field]) -> dict[str, Field]:
    return {f.name: f for f in fields}


SELECTOR_FIELDS: tuple[Field, ...] = (
    Field("policy", "policy", "xshare", "selection policy (xshare.selection.available_policies())"),
    Field("budget", "count", None, "m: experts kept per layer and batch (values above E mean E; none = "
          "0.5 of E, or E with a target mass, which is then uncapped)",
          optional=True, device=True, sweep=True, per_layer=True),
    Field("target_mass", "fraction", None,
          "tau: keep the fewest experts whose batch gate mass reaches this share of the batch's total "
          "(warm-up included; capped only by a budget that is given; none = the budget alone)",
          optional=True, device=True, sweep=True, per_layer=True),
    Field("warmup_k", "int", 1, "k0: every token keeps its own top-k0 experts (0 = no warm-up)", minimum=0,
          device=True, sweep=True),
    Field("group_budget", "count", None, "m_r: per-request budget of per-request policies (none = top_k)",
          optional=True, device=True, sweep=True),
    Field("anchor_k", "int", None, "per-request policies: the first row of a request with several rows (in a "
          "verify batch the accepted token, whose output is always kept) keeps its own top anchor_k experts "
          "(none = top_k, its own routing; 0 = the warm-up, like the request's other rows)", minimum=0,
          optional=True, device=True),
    Field("gpu_cap", "int", None, "c: per-GPU cap of GPU-aware policies (none = ceil(m / GPUs))", minimum=1,
          optional=True, device=True, sweep=True),
    Field("scoring", "choice", "softmax", "how router logits become gate scores (the layer's own)",
          choices=("softmax", "sigmoid"), scope="layer"),
    Field("renormalize", "bool", True, "renormalise each token's kept weights (the layer's own)", scope="layer"),
    Field("min_tokens", "int", 1, "smallest batch (rows) the policy applies to", minimum=0, device=True),
    Field("max_tokens", "int", None, "largest batch (rows) the policy applies to (none = no limit)", minimum=0,
          optional=True, device=True),
    Field("backend", "choice", "auto", "what routes a layer call: auto (the fused Triton kernel on GPUs, the C "
          "kernel on the CPU, else the torch reference) or one forced (a call it cannot route uses torch, counted)",
          choices=("auto", "triton", "c", "torch")),
    Field("extra", "mapping", {}, "policy-specific numeric knobs (validated by the policy)"),
)
SELECTOR = by_name(SELECTOR_FIELDS)
# What an operator sets (settings, admin endpoint, CLI); the others come from the served layer.
OPERATOR_FIELDS: tuple[Field, ...] = tuple(f for f in SELECTOR_FIELDS if f.scope == "selector")
SWEEP_FIELDS: tuple[Field, ...] = tuple(f for f in SELECTOR_FIELDS if f.sweep)
DEVICE_FIELDS: tuple[Field, ...] = tuple(f for f in SELECTOR_FIELDS if f.device)


def markdown_table(fields: Sequence[Field]) -> str:
    """The docs' settings table for ``fields`` (variable, value, default, meaning)."""
    lines = ["| variable | value | default | meaning |", "|---|---|---|---|"]
    for f in fields:
        default = f.to_text(f.default)
        shown = "none" if default is None else (default or "(empty)")
        if f.kind == "bool":
            shown = "on" if f.default else "off"
        lines.append(f"| `{f.env}` | {f.type_text} | {shown} | {f.help} |")
    return "\n".join(lines)
