"""xshare admin: read or change a running server's selector config (the /xshare admin endpoint).

    xshare admin get --url http://HOST:PORT --token-file /var/run/secrets/xshare/token
    xshare admin set --url ... --token T --budget 8 [--policy xshare --warmup-k 1 ...]
    xshare admin enable|disable --url ... --token T
    xshare admin stats --url ... --token T

The token comes from --token, --token-file or XSHARE_ADMIN_TOKEN. Prints the server's JSON reply;
exit code 0 on success, 1 on an HTTP error (the reply's detail is printed to stderr), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
from pathlib import Path
from typing import Any

from xshare._http import request
from xshare.selection.schema import OPERATOR_FIELDS

NAME = "admin"
HELP = "read or change a running server's selector config (/xshare admin endpoint)"


def _set_fields() -> list[tuple[str, Any]]:
    """The settings ``set`` can change: the operator's fields of the one schema (extra: JSON below), each
    parsed from its flag's text into a typed value where it enters (a bad value is a usage error)."""

    def typed(f: Any) -> Any:
        def parse(text: str) -> Any:
            try:
                return f.parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(f"{f.flag}: {exc}") from None
        return parse

    return [(f.name, typed(f), f"{f.help} ({f.type_text})") for f in OPERATOR_FIELDS if f.kind != "mapping"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("get", "set", "enable", "disable", "stats"))
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:30000")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--token", default=None, help="admin bearer token (default: $XSHARE_ADMIN_TOKEN)")
    tok.add_argument("--token-file", type=Path, default=None, help="file holding the token (a Kubernetes Secret)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--replace", action="store_true", help="set: PUT the whole config (unset fields -> defaults)")
    for name, typ, help_text in _set_fields():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=argparse.SUPPRESS,
                            help=help_text)
    parser.add_argument("--extra", default=argparse.SUPPRESS, help="JSON object of policy knobs")


def _token(args: argparse.Namespace) -> str | None:
    if args.token:
        return args.token
    if args.token_file is not None:
        try:
            return args.token_file.read_text().strip()
        except OSError as exc:
            raise SystemExit(f"xshare admin: --token-file {args.token_file}: {exc}") from None
    return os.environ.get("XSHARE_ADMIN_TOKEN") or None


def run(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    token = _token(args)
    body = None
    if args.action == "get":
        method, path = "GET", "/xshare/config"
    elif args.action == "stats":
        method, path = "GET", "/xshare/stats"
    elif args.action in ("enable", "disable"):
        method, path = "POST", f"/xshare/{args.action}"
    else:
        body = {name: getattr(args, name) for name, _, _ in _set_fields() if hasattr(args, name)}
        if hasattr(args, "extra"):
            try:
                body["extra"] = json.loads(args.extra)
            except json.JSONDecodeError as exc:
                print(f"xshare admin: --extra: not JSON ({exc})", file=sys.stderr)
                return 2
        if not body and not args.replace:
            flags = " ".join(f"--{n.replace('_', '-')}" for n, _, _ in _set_fields())
            print(f"xshare admin set: give at least one of {flags} --extra", file=sys.stderr)
            return 2
        method, path = ("PUT" if args.replace else "PATCH"), "/xshare/config"
    try:
        status, reply = request(base + path, method, token, body, args.timeout)
    except (urllib.error.URLError, OSError) as exc:
        print(f"xshare admin: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    if status >= 400:
        print(f"xshare admin: HTTP {status}: {json.dumps(reply)}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=1, sort_keys=True))
    return 0
