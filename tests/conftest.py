"""What several test files share: dependency checks, the tiny models, a running SGLang server, ports, processes.

pytest loads this file before the tests (and puts ``tests/`` on ``sys.path``, as the folder has no
``__init__.py``), so test files use the fixtures by name and the helpers with ``from conftest import ...``.
The tests sit in one folder per part of the package (``selection/``, ``sglang/``, ``eval/``, ``models/``,
``bench/``, ``deploy/``), real-server runs in ``e2e/``, and checks of the whole package here; this one
conftest serves them all (a second ``conftest.py`` would shadow ``from conftest import ...``).

Dependencies. :func:`require_module`, :func:`require_binary` and :func:`require_path` skip a test whose
dependency is missing, with the reason, on a developer's machine; under ``CI=true`` they fail it instead, so
that a CI run cannot pass with a part of the suite silently skipped (``scripts/bootstrap.sh`` and
``scripts/ci_system_deps.sh`` install every dependency they check).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from xshare.sglang.server import free_port, group_processes

if TYPE_CHECKING:
    from xshare.sglang.server import ServerProcess

__all__ = ["ROOT", "SHARED", "DASHBOARD", "SHORT_RECIPE_STEPS", "alive", "free_port", "group_processes", "in_ci",
           "missing", "require_binary", "require_module", "require_path", "running", "wait_targets_up"]

ROOT = Path(__file__).resolve().parents[1]
#: The shared folder next to the repository: recorded routing traces, published CRDs.
SHARED = ROOT.parent / "shared"
#: The Grafana dashboard, inside the Helm chart that ships it (dashboards/xshare-sglang.json links to it).
DASHBOARD = ROOT / "deploy" / "k8s" / "xshare-sglang" / "dashboards" / "xshare-sglang.json"
#: Training steps of the short recipe of the trained tiny model (the default shape, one thread): the model
#: the demo and the server benchmark tests load, trained in about a minute instead of the full recipe's 15.
SHORT_RECIPE_STEPS = 60


# -- dependencies: skip on a developer's machine, fail in CI -----------------------------------------------
def in_ci() -> bool:
    """True under ``CI=true`` (the value CI services set; ``.ci/run`` runs there)."""
    return os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> NoReturn:
    """A dependency of the calling test is missing: skip it with ``reason``, or under ``CI=true`` fail it.

    Works in a test, a fixture or at module level (a module-level failure in CI is a collection error, which
    fails the run too). Only what CI can always have goes through here: a Python package the set-up installs, a
    Debian package of ``scripts/ci_system_deps.sh``, a C compiler, the shared data folder. Hardware that a CI
    machine never has stays a plain ``skipif`` in its test file, e.g. a CUDA device
    (tests/selection/test_cuda_graph.py):
    failing there would only make CI red without a way to make it green.
    """
    __tracebackhide__ = True  # the skip or failure is reported at the test's line
    if in_ci():
        pytest.fail(f"{reason} (a missing dependency fails under CI=true)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, why: str = "", *, load: bool = True) -> ModuleType | None:
    """Import ``name`` (or with ``load=False`` only check that it is installed, for a heavy package), or
    :func:`missing`. ``why`` says what installs it, e.g. ``"scripts/install_deploy_tools.sh"``."""
    __tracebackhide__ = True
    hint = f" ({why})" if why else ""
    if not load:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing(f"{name} is not installed{hint}")
        return None
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # the module itself, or one it imports (then named)
        cause = "" if isinstance(exc, ModuleNotFoundError) and exc.name == name else f": {exc}"
        missing(f"{name} is not installed{hint}{cause}")


def require_binary(name: str, why: str = "") -> str:
    """The path of the program ``name`` on PATH, or :func:`missing`."""
    __tracebackhide__ = True
    exe = shutil.which(name)
    if exe is None:
        missing(f"{name} is not installed{f' ({why})' if why else ''}")
    return exe


def require_path(path: str | os.PathLike, why: str = "") -> Path:
    """``path`` if it exists (a file or folder the tests read, e.g. in ../shared), or :func:`missing`."""
    __tracebackhide__ = True
    p = Path(path)
    if not p.exists():
        missing(f"{p} is not present{f' ({why})' if why else ''}")
    return p


# -- processes and ports -----------------------------------------------------------------------------------
def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- the tiny models ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A folder of the test module's own (stats files, traces, logs of its server)."""
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deterministic tiny Qwen3-MoE (random weights, 16 experts, top-4, 2 MoE layers), built once a session."""
    from xshare.models.tiny_moe import TinyMoeSpec, build_tiny_moe

    return build_tiny_moe(tmp_path_factory.getbasetemp() / "tiny-moe", TinyMoeSpec())


@pytest.fixture(scope="session")
def short_recipe() -> Any:
    """The :class:`~xshare.models.config.TinyConfig` of :func:`trained_model`."""
    from xshare.models.config import TinyConfig

    return TinyConfig(steps=SHORT_RECIPE_STEPS, threads=1)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory, short_recipe: Any) -> Path:
    """The trained tiny model at the short recipe, trained once a session (loaded if already there)."""
    from xshare.models.cache import ensure_model

    return ensure_model(tmp_path_factory.getbasetemp() / f"tiny-trained-{SHORT_RECIPE_STEPS}", short_recipe,
                        log=None, eval_problems=0)


@pytest.fixture(scope="session")
def trained_auxfree_model() -> Path:
    """The aux-loss-free trained model (GLM-4.5 architecture, DeepSeek-V3's router; the full recipe of
    :class:`~xshare.models.config.AuxFreeConfig`) from the cache, where ``make test``'s set-up trains it (trained
    here if missing: about 8 minutes on 2 cores)."""
    from xshare.models.cache import ensure_model
    from xshare.models.config import AuxFreeConfig

    return ensure_model(cfg=AuxFreeConfig(), log=None)


# -- a running SGLang server -----------------------------------------------------------------------------------
@contextlib.contextmanager
def running(srv: ServerProcess, label: str = "server") -> Iterator[ServerProcess]:
    """Start ``srv`` (an ``xshare serve`` process), yield it, stop it; then assert that its SIGTERM stop left no
    process of its group behind. For a module fixture: ``with running(ServerProcess(...)) as srv: yield srv``."""
    srv.start()
    print(f"\n{label} ready in {srv.startup_seconds:.1f} s")
    try:
        yield srv
    finally:
        leftovers = srv.stop()
    assert not leftovers, f"processes left after SIGTERM: {leftovers}"


def wait_targets_up(prom: Any, count: int | None = None, timeout: float = 60, settle: float = 0) -> list[dict]:
    """Poll a :class:`xshare.deploy.panel_png.LocalPrometheus` until its scrape targets (``count`` of them, or at
    least one) are all up and ``settle`` seconds have passed, or ``timeout``; returns the last target list (the
    caller asserts on it)."""
    start = time.monotonic()
    up: list[dict] = []
    while time.monotonic() < start + timeout:
        up = prom.targets_up()
        if (len(up) == count if count is not None else up) and all(t["health"] == "up" for t in up) \
                and time.monotonic() - start >= settle:
            break
        time.sleep(0.5)
    return up
