"""SGLang's one-batch benchmark (``sglang.benchmark.one_batch``) with the plugin loaded.

``python -m sglang.benchmark.one_batch`` runs the model in its own process without calling SGLang's
``load_plugins()``, so the plugin's hooks never reach it and ``XSHARE_ENABLE=1`` alone does nothing
there (no plugin code runs that could warn). This module is the same benchmark with the plugin: it
loads SGLang's plugins with the hooks allowed outside scheduler processes, in this process and in
every worker process the benchmark spawns (``--tp`` > 1), then runs the benchmark's own CLI.

    python -m xshare.sglang.one_batch <any sglang.benchmark.one_batch argument>

(``xshare one-batch`` validates the ``--xshare-*`` options first and runs this.)
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from xshare.sglang.settings import HOOK_ALL_ENV

#: The benchmark's work functions, which it runs in this process or in one process per TP rank.
WORK_FUNCTIONS = ("latency_test", "correctness_test")


def _load_plugins() -> None:
    os.environ[HOOK_ALL_ENV] = "1"  # the model runs here, not in a scheduler process
    from sglang.srt.plugins import load_plugins

    load_plugins()  # idempotent


def run_work(name: str, *args: Any, **kwargs: Any) -> Any:
    """One of the benchmark's work functions, after loading the plugins in the calling process (a
    spawned TP worker starts without them)."""
    _load_plugins()
    import sglang.benchmark.one_batch as one_batch

    fn = getattr(one_batch, name)
    if isinstance(fn, functools.partial):  # this process patched it: the original is kept aside
        fn = _ORIGINALS[name]
    return fn(*args, **kwargs)


_ORIGINALS: dict[str, Any] = {}


def main(argv: list[str] | None = None) -> None:
    _load_plugins()
    import sglang.benchmark.one_batch as one_batch

    for name in WORK_FUNCTIONS:
        _ORIGINALS[name] = getattr(one_batch, name)
        setattr(one_batch, name, functools.partial(run_work, name))
    sys.argv = ["sglang.benchmark.one_batch", *(sys.argv[1:] if argv is None else argv)]
    one_batch.cli_main()


if __name__ == "__main__":
    main()
