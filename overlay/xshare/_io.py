"""Output of the command line: the one atomic JSON writer of the project, the usage-error line, help epilogs."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    """Write ``data`` as JSON to ``path`` all at once (a temp file in the same directory renamed into
    place): readers never see a partial file, and a failed write leaves no temp file behind."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent, sort_keys=sort_keys)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def usage_error(prog: str, problem: object) -> int:
    """Say on stderr what is wrong with the command line (``PROG: error: PROBLEM``); returns exit status 2."""
    print(f"{prog}: error: {problem}", file=sys.stderr)
    return 2


def help_epilog(p: argparse.ArgumentParser, text: str) -> None:
    """Show ``text`` under the options of ``p``'s help, its line breaks kept (examples, pointers to the docs)."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = text
