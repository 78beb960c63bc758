"""The ``xshare`` command line.

Every sub-command is a module in :mod:`xshare.commands` that defines ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Adding a command adds one file; this module
discovers them, so it never changes.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
from collections.abc import Sequence

from xshare import __version__, commands


def _command_modules() -> list:
    mods = []
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mods.append(importlib.import_module(f"{commands.__name__}.{info.name}"))
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xshare", description="XShare for SGLang: batch-aware MoE expert selection."
    )
    parser.add_argument("--version", action="version", version=f"xshare {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def extra_providing(module: str) -> tuple[str, str] | None:
    """``(distribution, extra)`` when ``module`` is installed by an optional extra of this package (the
    ``[project.optional-dependencies]`` of pyproject.toml, read from the installed metadata), else None."""
    from importlib import metadata

    top = module.split(".")[0].lower().replace("-", "_")
    for dist in metadata.packages_distributions().get(__package__, []):
        for req in metadata.requires(dist) or []:
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)[^;]*;\s*extra\s*==\s*['\"]([^'\"]+)['\"]", req)
            if m and re.sub(r"[-.]", "_", m.group(1).lower()) == top:
                return dist, m.group(2)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if extra and not getattr(args, "_accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args._extra = extra
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:  # a package of an optional extra: say which extra to install
        found = extra_providing(exc.name or "")
        if found is None:
            raise
        dist, extra = found
        print(f"xshare {args.command}: error: {exc.name} is not installed; 'xshare {args.command}' needs the "
              f"{extra} extra: pip install '{dist}[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
