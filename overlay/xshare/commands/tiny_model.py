"""``xshare tiny-model DIR [--arch NAME]``: build a tiny, deterministic MoE test model (no hub), untrained.

The fast way to a model for serving tests: :func:`xshare.models.tiny_moe.build_tiny_moe`, through the
same builder as the trained model of ``xshare train-tiny`` (:mod:`xshare.models.architecture`).
``--arch`` picks a preset (:data:`xshare.models.tiny_moe.PRESETS`: ``qwen3_moe``, the default;
``glm45``; ``deepseek_v3_router``; ``mixtral``); every field of its spec can be overridden
(``--num-experts 32``), and a field another architecture does not have is an error.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

NAME = "tiny-model"
HELP = ("build a tiny deterministic MoE model (Qwen3-MoE, GLM-4.5 / DeepSeek-V3 router, Mixtral; HF format, "
        "own tokenizer) for tests and demos")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _spec_fields() -> dict[str, tuple[type, dict[str, Any]]]:
    """Every spec field of every preset: name -> (type of its value, {preset: default})."""
    from xshare.models.tiny_moe import PRESETS

    out: dict[str, tuple[type, dict[str, Any]]] = {}
    for arch, spec in PRESETS.items():
        for f in fields(spec):
            value = getattr(spec, f.name)
            out.setdefault(f.name, (type(value), {}))[1][arch] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from xshare.models.tiny_moe import PRESETS

    parser.add_argument("out_dir", help="directory to write (reused when it holds the same build)")
    parser.add_argument("--arch", choices=list(PRESETS), default="qwen3_moe",
                        help="architecture and router preset (default: qwen3_moe)")
    for name, (kind, defaults) in _spec_fields().items():
        values = {str(v) for v in defaults.values()}
        shown = values.pop() if len(values) == 1 else ", ".join(f"{a}: {v}" for a, v in defaults.items())
        only = "" if len(defaults) == len(PRESETS) else f"{'/'.join(defaults)} only; "
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=_bool if kind is bool else kind,
                            default=None, help=f"{only}default: {shown}")


def run(args: argparse.Namespace) -> int:
    from xshare.models.tiny_moe import build_tiny_moe, preset

    try:
        given = {name: getattr(args, name) for name in _spec_fields() if getattr(args, name) is not None}
        spec = preset(args.arch, **given)
        out = build_tiny_moe(args.out_dir, spec)
    except (ValueError, FileExistsError) as exc:
        print(f"xshare tiny-model: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"xshare tiny-model: needs transformers and tokenizers ({exc}); run scripts/install_sglang_cpu.sh",
              file=sys.stderr)
        return 2
    print(out)
    return 0
