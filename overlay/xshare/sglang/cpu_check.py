"""Which ``sgl_kernel`` symbols does an installed SGLang import on the CPU, and does our stand-in
provide them all?

SGLang's CPU engine imports ``*_cpu`` functions from ``sgl_kernel`` at module level, inside
``if _is_cpu:``-style blocks (or ``elif not _is_xpu:`` after the GPU branches). A new SGLang release
can add one; this check finds them by parsing SGLang's source (nothing is imported from sglang) and
fails loudly, naming the missing symbol and where it is imported, instead of letting the server die
later with an ImportError.

Speculative decoding calls more of them, only once a verify batch runs. The stand-in implements
those of NGRAM and keeps placeholders (``XSHARE_UNSUPPORTED``) for the draft-model algorithms;
:func:`speculative_problem` names, for one ``--speculative-algorithm``, the ops the stand-in cannot
run (``xshare serve --device cpu`` refuses such a server before SGLang starts).

    python -m xshare.sglang.cpu_check [--sglang-dir DIR] [--stand-in DIR] [--speculative-algorithm NAME]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

_SKIP_DIRS = {"multimodal_gen", "test", "tests"}
_OTHER_DEVICES = ("cuda", "hip", "musa", "npu", "xpu")

# What each speculative algorithm of SGLang 0.5.23 calls on the CPU that the test bed provides: the
# sgl_kernel ops of sglang.kernels.ops.speculative (cache_locs, eagle, reconstruct_tree, spec_tree,
# multi_layer_eagle) its worker reaches, and the verify path of the torch-native attention
# (xshare_cpu_fixes). The draft-model list holds the ops known so far: the stand-in refuses those
# algorithms at the first one it lacks.
_VERIFY_OPS = ("sgl_kernel.verify_tree_greedy_cpu", "sgl_kernel.fill_accept_out_cache_loc_cpu",
               "sgl_kernel.assign_extend_cache_locs_cpu", "xshare_cpu_fixes.tree_verify_attention")
_DRAFT_MODEL_OPS = ("sgl_kernel.build_tree_kernel_efficient_cpu", "sgl_kernel.assign_draft_cache_locs_contiguous_cpu",
                    "sgl_kernel.fill_bonus_tokens_cpu", *_VERIFY_OPS)
SPECULATIVE_OPS: dict[str, tuple[str, ...]] = {
    "NGRAM": ("sgl_kernel.speculative.reconstruct_indices_from_tree_mask", *_VERIFY_OPS),
    "EAGLE": _DRAFT_MODEL_OPS,
    "EAGLE3": _DRAFT_MODEL_OPS,
    "STANDALONE": _DRAFT_MODEL_OPS,
}
SPECULATIVE_ALIASES = {"NEXTN": "EAGLE", "MTP": "EAGLE"}


@dataclass(frozen=True)
class KernelImport:
    """``from <module> import <name>`` found under a CPU-only module-level branch."""

    module: str  # 'sgl_kernel' or 'sgl_kernel.sub'
    name: str
    where: str  # 'path/inside/sglang.py:line'

    @property
    def symbol(self) -> str:
        return f"{self.module}.{self.name}"


def _is_cpu_test(test: ast.expr) -> bool:
    """A condition true on the CPU engine: it names the CPU (not AMX/ARM), or negates another device
    (``not _is_xpu``: reached on the CPU once the GPU branches before it are not taken)."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        operand = ast.unparse(test.operand).lower()
        return "cpu" not in operand and any(d in operand for d in _OTHER_DEVICES)
    text = ast.unparse(test).lower()
    return "cpu" in text and "amx" not in text and "arm" not in text


def _imports_in(stmts: list[ast.stmt]) -> list[ast.ImportFrom]:
    found = []
    for stmt in stmts:
        for node in ast.walk(stmt):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "sgl_kernel" or node.module.startswith("sgl_kernel."):
                    found.append(node)
    return found


def _cpu_branches(stmts: list[ast.stmt]) -> list[list[ast.stmt]]:
    """Bodies of module-level ``if``/``elif`` branches whose condition names the CPU (not AMX/ARM)."""
    bodies = []
    for stmt in stmts:
        node = stmt
        while isinstance(node, ast.If):
            if _is_cpu_test(node.test):
                bodies.append(node.body)
            if len(node.orelse) == 1 and isinstance(node.orelse[0], ast.If):
                node = node.orelse[0]  # elif
            else:
                break
    return bodies


def find_cpu_kernel_imports(sglang_dir: Path) -> list[KernelImport]:
    """Every ``from sgl_kernel... import X`` inside a module-level CPU branch of SGLang's source."""
    sglang_dir = Path(sglang_dir)
    found: list[KernelImport] = []
    for path in sorted(sglang_dir.rglob("*.py")):
        rel = path.relative_to(sglang_dir)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            if "sgl_kernel" not in text:
                continue
            tree = ast.parse(text, filename=str(path))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for body in _cpu_branches(tree.body):
            for imp in _imports_in(body):
                for alias in imp.names:
                    found.append(KernelImport(imp.module, alias.name, f"{rel}:{imp.lineno}"))
    return found


def sglang_source_dir() -> Path:
    """The installed sglang package directory (located without importing it)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("sglang is not installed in this environment")
    return Path(next(iter(spec.submodule_search_locations)))


def _stand_in_attr(stand_in_dir: Path | None, module: str, name: str) -> object | None:
    """``module.name`` imported afresh from ``stand_in_dir`` (else the installed module), or None."""
    top = module.split(".")[0]
    mine = lambda k: k == top or k.startswith(top + ".")  # noqa: E731
    saved = {k: v for k, v in sys.modules.items() if mine(k)}
    for k in saved:
        del sys.modules[k]
    if stand_in_dir is not None:
        sys.path.insert(0, str(stand_in_dir))
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    finally:
        if stand_in_dir is not None:
            sys.path.remove(str(stand_in_dir))
        for k in [k for k in sys.modules if mine(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def _provides(stand_in_dir: Path | None, module: str, name: str) -> bool:
    return _stand_in_attr(stand_in_dir, module, name) is not None


def missing_speculative_ops(algorithm: str, stand_in_dir: Path | None = None) -> list[str] | None:
    """The ops of :data:`SPECULATIVE_OPS` the stand-in lacks or only holds a placeholder for, for
    ``--speculative-algorithm algorithm``; None for an algorithm the table does not know."""
    name = algorithm.upper()
    ops = SPECULATIVE_OPS.get(SPECULATIVE_ALIASES.get(name, name))
    if ops is None:
        return None
    out = []
    for op in ops:
        module, attr = op.rsplit(".", 1)
        found = _stand_in_attr(stand_in_dir, module, attr)
        if found is None or getattr(found, "XSHARE_UNSUPPORTED", None) is not None:
            out.append(op)
    return out


def speculative_problem(algorithm: str, stand_in_dir: Path | None = None) -> str | None:
    """Why the CPU test bed cannot run ``--speculative-algorithm algorithm`` (naming the missing ops),
    or None when it can."""
    runs = sorted(a for a in SPECULATIVE_OPS if not missing_speculative_ops(a, stand_in_dir))
    missing = missing_speculative_ops(algorithm, stand_in_dir)
    if missing is None:
        return (f"--speculative-algorithm {algorithm}: not known to run on the CPU test bed "
                f"(it runs: {', '.join(runs) or 'none'})")
    if missing:
        return (f"--speculative-algorithm {algorithm}: the CPU stand-ins cannot run it: missing "
                f"{', '.join(missing)} (overlay/cpu_shims/; it runs: {', '.join(runs) or 'none'})")
    return None


def missing_symbols(imports: list[KernelImport], stand_in_dir: Path | None = None) -> list[KernelImport]:
    """The imports the ``sgl_kernel`` stand-in (in ``stand_in_dir``, else the installed one) lacks."""
    return [imp for imp in imports if not _provides(stand_in_dir, imp.module, imp.name)]


def _installed_stand_in_digest() -> str | None:
    spec = importlib.util.find_spec("sgl_kernel")
    if spec is None or not spec.submodule_search_locations:
        return None
    h = hashlib.sha256()
    for path in sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def cached_missing_symbols(cache_file: Path | None = None) -> list[KernelImport]:
    """:func:`missing_symbols` for the installed sglang and stand-in, remembered in a small JSON
    file in the environment (keyed by sglang's version and location and the stand-in's content),
    so that launching a server does not re-parse sglang's source every time."""
    sglang_dir = sglang_source_dir()
    try:
        version = metadata.version("sglang")
    except metadata.PackageNotFoundError:
        version = "unknown"
    key = {"sglang": version, "dir": str(sglang_dir), "stand_in": _installed_stand_in_digest()}
    cache_file = cache_file or Path(sys.prefix) / ".xshare-cpu-check.json"
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return [KernelImport(**m) for m in cached["missing"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    missing = missing_symbols(find_cpu_kernel_imports(sglang_dir))
    try:
        cache_file.write_text(json.dumps({"key": key, "missing": [dataclasses.asdict(m) for m in missing]}))
    except OSError:
        pass
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xshare.sglang.cpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sglang-dir", type=Path, default=None, help="sglang package directory (default: installed)")
    parser.add_argument("--stand-in", type=Path, default=None,
                        help="directory holding the sgl_kernel stand-in (default: the installed sgl_kernel)")
    parser.add_argument("--speculative-algorithm", metavar="NAME", default=None,
                        help="also check that the stand-in runs this speculative algorithm (e.g. NGRAM)")
    args = parser.parse_args(argv)
    if args.speculative_algorithm is not None:
        problem = speculative_problem(args.speculative_algorithm, args.stand_in)
        if problem is not None:
            print(f"cpu_check: {problem}", file=sys.stderr)
            return 1
    sglang_dir = args.sglang_dir or sglang_source_dir()
    imports = find_cpu_kernel_imports(sglang_dir)
    if not imports:
        print(f"cpu_check: no CPU sgl_kernel imports found under {sglang_dir} (is this sglang's source?)",
              file=sys.stderr)
        return 1
    missing = missing_symbols(imports, args.stand_in)
    if missing:
        for imp in missing:
            print(f"cpu_check: MISSING sgl_kernel symbol {imp.symbol} (imported at sglang/{imp.where}); "
                  "add it to overlay/cpu_shims/sgl_kernel", file=sys.stderr)
        return 1
    names = sorted({imp.symbol for imp in imports})
    print(f"cpu_check: the sgl_kernel stand-in provides all {len(names)} CPU symbols sglang imports", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
