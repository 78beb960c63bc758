"""``xshare serve``: launch SGLang with the XShare plugin enabled.

    xshare serve [--xshare-policy xshare --xshare-budget 8 ...] --model-path MODEL [any sglang.launch_server argument]

The ``--xshare-*`` options become ``XSHARE_*`` environment variables (validated here first, so a
bad value stops before SGLang starts), every other argument goes to ``python -m
sglang.launch_server`` unchanged, and this process is replaced by SGLang's (signals reach it
directly). With ``--device cpu`` it also sets what SGLang's CPU engine needs
(``SGLANG_USE_CPU_ENGINE=1``, ``--attention-backend torch_native`` and a bounded KV cache unless
given, one group of cores per rank when there are several) and checks that the installed
``sgl_kernel`` stand-in covers this sglang.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from importlib import metadata
from pathlib import Path

NAME = "serve"
HELP = "launch an SGLang server (sglang.launch_server) with the XShare plugin enabled"

ALLOW_ENV = "XSHARE_ALLOW_ANY_SGLANG"
CPU_DEFAULTS = (("--attention-backend", "torch_native"), ("--max-total-tokens", "8192"))

# The settings given as --xshare-<name> options: every setting of the schema (xshare.sglang.settings
# FIELDS) except the on/off switch (--xshare-disable) and the bool switches, which are flags below.
def _options() -> dict[str, tuple[str, type, str]]:
    from xshare.sglang.settings import FIELDS

    return {f.name: ("--xshare-" + f.name.replace("_", "-"), str, f"{f.help} ({f.type_text})")
            for f in FIELDS if f.kind != "bool"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("xshare options (everything else goes to sglang.launch_server)")
    for key, (flag, typ, help_text) in _options().items():
        g.add_argument(flag, dest=f"xs_{key}", type=typ, default=None, help=help_text)
    g.add_argument("--xshare-config", default=None, help="JSON file of settings (XSHARE_CONFIG)")
    g.add_argument("--xshare-apply-prefill", action="store_true", default=None, help="also select on prefill batches")
    g.add_argument("--xshare-disable", action="store_true",
                   help="load the plugin with the selector off (vanilla SGLang routing, for comparisons)")
    g.add_argument("--xshare-allow-any-sglang", action="store_true",
                   help=f"run on an sglang other than the pinned version (also: {ALLOW_ENV}=1)")
    g.add_argument("--xshare-print-command", action="store_true",
                   help="print the environment and command instead of running them")
    parser.set_defaults(_accepts_extra=True)


def _option_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _has_option(argv: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in argv)


def check_sglang_version(allow_any: bool) -> str | None:
    """An error message when sglang is missing or not the pinned version (None = fine)."""
    from xshare.sglang import SGLANG_VERSION

    try:
        version = metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return "sglang is not installed in this environment (CPU: bash scripts/install_sglang_cpu.sh)"
    if version != SGLANG_VERSION and not allow_any:
        return (f"sglang {version} is installed but xshare is pinned to sglang {SGLANG_VERSION} (its hooks target "
                f"that version's internals); install sglang=={SGLANG_VERSION}, or override with "
                f"--xshare-allow-any-sglang / {ALLOW_ENV}=1")
    return None


def plugin_installed() -> bool:
    from xshare.sglang import ENTRY_POINT_GROUP, PLUGIN_NAME

    return any(ep.name == PLUGIN_NAME for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))


_SIZE_FLAGS = (("--tp", "--tp-size", "--tensor-parallel-size"), ("--dp", "--dp-size", "--data-parallel-size"),
               ("--pp", "--pp-size", "--pipeline-parallel-size"))


def cpu_thread_binding(argv: list[str], cores: list[int]) -> str | None:
    """SGLANG_CPU_OMP_THREADS_BIND for a CPU launch with several ranks (tp * dp * pp): the
    available cores split into one contiguous group per rank (shared round robin when there are
    fewer cores than ranks). None for a single rank (SGLang's default binding then works)."""
    ranks = 1
    for names in _SIZE_FLAGS:
        for name in names:
            v = _option_value(argv, name)
            if v is not None:
                try:
                    ranks *= max(1, int(v))
                except ValueError:
                    pass
                break
    if ranks <= 1 or not cores:
        return None
    cores = sorted(cores)
    if len(cores) < ranks:
        return "|".join(str(cores[i % len(cores)]) for i in range(ranks))
    per, extra = divmod(len(cores), ranks)
    groups, start = [], 0
    for r in range(ranks):
        n = per + (1 if r < extra else 0)
        chunk = cores[start:start + n]
        start += n
        groups.append(f"{chunk[0]}-{chunk[-1]}" if len(chunk) > 1 and chunk[-1] - chunk[0] == n - 1
                      else ",".join(map(str, chunk)))
    return "|".join(groups)


@functools.lru_cache(maxsize=1)
def _missing_cpu_symbols() -> tuple:
    from xshare.sglang.cpu_check import cached_missing_symbols

    return tuple(cached_missing_symbols())


def build_launch(args: argparse.Namespace, environ: dict[str, str],
                 module: str = "sglang.launch_server") -> tuple[list[str], dict[str, str]]:
    """The command (``python -m <module> ...``) and environment ``xshare serve`` runs; raises
    ValueError with a message."""
    from xshare.selection.schema import parse_bool_text
    from xshare.sglang.settings import SettingError, load_settings, settings_env

    extra = list(getattr(args, "_extra", []) or [])
    stray = [a for a in extra if a.startswith("--xshare")]
    if stray:
        raise ValueError(f"unknown xshare option(s): {' '.join(stray)} (see xshare serve --help)")
    env = dict(environ)
    options = _options()
    values = {k: getattr(args, f"xs_{k}") for k in options if getattr(args, f"xs_{k}", None) is not None}
    if args.xshare_apply_prefill:
        values["apply_prefill"] = True
    values["enable"] = not args.xshare_disable
    try:
        env.update(settings_env(values))
        if args.xshare_config:
            env["XSHARE_CONFIG"] = str(Path(args.xshare_config).resolve())
        load_settings(env)  # the plugin will read the same variables in every SGLang process
    except SettingError as exc:
        msg = str(exc)
        for key, (flag, _, _) in options.items():
            if key in values and msg.startswith(f"XSHARE_{key.upper()}="):
                msg = f"{flag} / {msg}"
                break
        raise ValueError(msg) from None
    allow_any = args.xshare_allow_any_sglang or parse_bool_text(env.get(ALLOW_ENV, "")) is True
    problem = check_sglang_version(allow_any)
    if problem:
        raise ValueError(problem)
    if allow_any:
        env[ALLOW_ENV] = "1"
    if not plugin_installed():
        raise ValueError("the xshare SGLang plugin entry point is not installed (reinstall: pip install -e .)")
    if _option_value(extra, "--device") == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        if "SGLANG_CPU_OMP_THREADS_BIND" not in env:
            binding = cpu_thread_binding(extra, sorted(os.sched_getaffinity(0)))
            if binding is not None:
                env["SGLANG_CPU_OMP_THREADS_BIND"] = binding
        for flag, value in CPU_DEFAULTS:
            if not _has_option(extra, flag):
                extra += [flag, value]
        missing = _missing_cpu_symbols()
        if missing:
            names = ", ".join(sorted({f"{m.symbol} (sglang/{m.where})" for m in missing}))
            raise ValueError(f"the sgl_kernel CPU stand-in lacks {names}; see overlay/cpu_shims/")
        algorithm = _option_value(extra, "--speculative-algorithm")
        if algorithm is not None:
            from xshare.sglang.cpu_check import speculative_problem

            problem = speculative_problem(algorithm)
            if problem is not None:
                raise ValueError(problem)
    cmd = [sys.executable, "-m", module, *extra]
    return cmd, env


def run(args: argparse.Namespace, module: str = "sglang.launch_server", name: str = NAME) -> int:
    try:
        cmd, env = build_launch(args, dict(os.environ), module)
    except ValueError as exc:
        print(f"xshare {name}: {exc}", file=sys.stderr)
        return 2
    if args.xshare_print_command:
        for k in sorted(env):
            if (k.startswith("XSHARE_") or k.startswith("SGLANG_")) and env.get(k) != os.environ.get(k):
                print(f"{k}={env[k]}")
        print(" ".join(cmd))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached
