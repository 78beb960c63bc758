"""The dependency checks of tests/conftest.py: a missing dependency skips a test on a developer's machine and fails
it under ``CI=true``; a present one is returned. Checked on the helpers directly and through a real pytest run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_binary, require_module, require_path

ABSENT = "xshare_module_that_is_not_installed"
CHECKS = [
    lambda: require_module(ABSENT, "for the test"),
    lambda: require_module(ABSENT, "for the test", load=False),
    lambda: require_module(f"{ABSENT}.sub", load=False),
    lambda: require_binary("xshare-binary-that-is-not-installed", "for the test"),
    lambda: require_path("/nonexistent/xshare/data", "for the test"),
]


@pytest.mark.parametrize("check", CHECKS)
def test_missing_fails_under_ci(monkeypatch, check):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not (installed|present).*a missing dependency fails under CI"):
        check()


@pytest.mark.parametrize("ci", [None, "false", ""])
@pytest.mark.parametrize("check", CHECKS)
def test_missing_skips_elsewhere(monkeypatch, check, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="not (installed|present)") as info:
        check()
    assert "CI" not in str(info.value)


def test_present_dependencies_are_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require_module("json").dumps([1]) == "[1]"
    assert require_module("json", load=False) is None
    assert Path(require_binary("sh")).is_file()
    assert require_path(__file__) == Path(__file__)


TEST_FILE = f"""
from conftest import require_module

def test_needs_it():
    require_module("{ABSENT}", "the test's dependency")

def test_needs_nothing():
    pass
"""

MODULE_LEVEL = f"""
from conftest import require_module

require_module("{ABSENT}")

def test_needs_it():
    pass
"""


def _pytest(tmp_path: Path, source: str, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", "--rootdir",
                           str(tmp_path), str(tmp_path / "test_probe.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_real_run_skips_locally_and_fails_under_ci(tmp_path):
    local = _pytest(tmp_path, TEST_FILE, None)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "1 passed, 1 skipped" in local.stdout
    assert f"test_probe.py:5: {ABSENT} is not installed (the test's dependency)" in local.stdout  # the test's line
    ci = _pytest(tmp_path, TEST_FILE, "true")
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "1 failed, 1 passed" in ci.stdout and "a missing dependency fails under CI=true" in ci.stdout


def test_a_module_level_check_skips_the_file_locally_and_fails_the_run_under_ci(tmp_path):
    local = _pytest(tmp_path, MODULE_LEVEL, None)
    assert local.returncode == 5 and "1 skipped" in local.stdout, local.stdout + local.stderr  # 5: no test ran
    ci = _pytest(tmp_path, MODULE_LEVEL, "true")
    assert ci.returncode != 0 and "a missing dependency fails under CI=true" in ci.stdout, ci.stdout + ci.stderr
