"""The selection core's import boundaries, read from the source (no import is executed).

* The core (``overlay/xshare/selection``) knows no engine: none of its modules imports the SGLang
  adapter (``xshare.sglang``) or SGLang itself.
* ``decide`` is the one door: no module of the package outside the core imports a backend's routing
  step (the functions ``xshare.selection.decide.decide`` calls), so every layer call goes through the
  backend choice and its reasons.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "overlay" / "xshare"
CORE = ROOT / "selection"
# the steps decide() chains; callers outside the core reach them only through decide()
ROUTING_STEPS = {"decide_plain", "decide_router", "decide_global", "decide_cpu", "decide_router_c", "decide_fused",
                 "fused_route", "cpu_route", "cpu_router_route", "cpu_router_served", "prepare_batch",
                 "finish_routing"}


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every import in ``path``, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
    return out


def test_the_core_imports_no_engine():
    found = [f"{p.relative_to(ROOT)}: {mod}" for p in sorted(CORE.rglob("*.py")) for mod, _ in _imports(p)
             if mod.split(".")[0] == "sglang" or mod.startswith("xshare.sglang")]
    assert found == []
    assert len(list(CORE.rglob("*.py"))) > 20  # the walk saw the core


def test_callers_outside_the_core_go_through_decide():
    outside = [p for p in sorted(ROOT.rglob("*.py")) if CORE not in p.parents]
    found = [f"{p.relative_to(ROOT)}: {mod}.{name}" for p in outside for mod, name in _imports(p)
             if mod.startswith("xshare.selection") and name in ROUTING_STEPS]
    assert found == []
    assert any(("xshare.selection.decide", "decide") in _imports(p) for p in outside)  # the door is used
