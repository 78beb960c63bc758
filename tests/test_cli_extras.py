"""A command whose optional extra is not installed says which extra to install (``xshare eval`` without ``[eval]``).

The subprocesses run ``xshare`` with the extra's packages made unimportable: a finder first on ``sys.meta_path``
raises ModuleNotFoundError for them, exactly what ``import tqdm`` raises where tqdm is not installed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from xshare.cli import extra_providing
from xshare.eval.synth import write_synthetic_trace

WITHOUT = """
import sys

BLOCKED = set(sys.argv[1].split(","))


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
from xshare.cli import main

sys.exit(main(sys.argv[2:]))
"""


def _xshare_without(blocked: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT, blocked, *argv], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return write_synthetic_trace(tmp_path_factory.mktemp("trace") / "t.npz", num_seqs=6, num_experts=16, top_k=4,
                                 seed=1)


def test_the_extras_come_from_the_package_metadata():
    assert extra_providing("tqdm") == ("xshare-sglang", "eval")
    assert extra_providing("matplotlib.pyplot") == ("xshare-sglang", "eval")
    assert extra_providing("numpy") == ("xshare-sglang", "eval")
    assert extra_providing("ray") == ("xshare-sglang", "deploy")
    assert extra_providing("json") is None and extra_providing("") is None


def test_eval_without_tqdm_names_the_extra(trace, tmp_path):
    r = _xshare_without("tqdm,matplotlib", "eval", "--trace", trace, "--batch", "4", "--budget", "4", "--json",
                        str(tmp_path / "r.json"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "xshare eval: error: tqdm is not installed" in r.stderr
    assert "pip install 'xshare-sglang[eval]'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "r.json").exists()


def test_eval_without_matplotlib_fails_only_with_plot_and_before_the_replay(trace, tmp_path):
    args = ["eval", "--trace", trace, "--batch", "4", "--budget", "4", "--no-progress"]
    r = _xshare_without("matplotlib", *args, "--plot", str(tmp_path / "plots"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "matplotlib is not installed" in r.stderr and "pip install 'xshare-sglang[eval]'" in r.stderr
    assert "replay:" not in r.stdout  # said at once, not after the work
    r = _xshare_without("matplotlib", *args, "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.json").is_file()


def test_a_missing_module_of_no_extra_is_not_disguised(trace):
    r = _xshare_without("xshare.eval", "eval", "--trace", trace)
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert "ModuleNotFoundError: No module named 'xshare.eval'" in r.stderr and "pip install" not in r.stderr
