"""``xshare one-batch``: SGLang's one-batch benchmark (``sglang.benchmark.one_batch``) with the plugin.

    xshare one-batch [--xshare-policy xshare --xshare-budget 8 ...] --model-path MODEL --batch-size 32 ...

The same ``--xshare-*`` options and CPU set-up as ``xshare serve``; everything else goes to the
benchmark. SGLang's benchmark does not load plugins by itself (``XSHARE_ENABLE=1`` alone does
nothing there), so this runs it through :mod:`xshare.sglang.one_batch`, which does.
"""

from __future__ import annotations

import argparse

from xshare.commands import serve

NAME = "one-batch"
HELP = "run SGLang's one-batch benchmark (sglang.benchmark.one_batch) with the XShare plugin loaded"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    serve.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return serve.run(args, module="xshare.sglang.one_batch", name=NAME)
