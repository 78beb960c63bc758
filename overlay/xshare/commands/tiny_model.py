"""``xshare tiny-model DIR``: build the tiny, deterministic Qwen3-MoE test model (no hub), untrained.

The fast way to a model for serving tests: :func:`xshare.models.tiny_moe.build_tiny_moe`, through the
same builder as the trained model of ``xshare train-tiny`` (:mod:`xshare.models.architecture`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

NAME = "tiny-model"
HELP = "build a tiny deterministic Qwen3-MoE model (HF format, own tokenizer) for tests and demos"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from xshare.models.tiny_moe import TinyMoeSpec

    parser.add_argument("out_dir", help="directory to write (reused when it holds the same build)")
    defaults = TinyMoeSpec()
    for f in fields(TinyMoeSpec):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        parser.add_argument(flag, dest=f.name, type=type(value), default=value, help=f"default: {value}")


def run(args: argparse.Namespace) -> int:
    from xshare.models.tiny_moe import TinyMoeSpec, build_tiny_moe

    try:
        spec = TinyMoeSpec(**{f.name: getattr(args, f.name) for f in fields(TinyMoeSpec)})
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
