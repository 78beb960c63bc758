"""``xshare serve``: argument handling, bad settings, the sglang version pin (no server started)."""

import subprocess
import sys
from importlib import metadata

import pytest

from xshare.cli import build_parser
from xshare.commands import serve


def parse(argv):
    parser = build_parser()
    args, extra = parser.parse_known_args(["serve", *argv])
    args._extra = extra
    return args


def test_cpu_launch_command_and_environment():
    cmd, env = serve.build_launch(parse(["--xshare-policy", "xshare", "--xshare-budget", "4", "--model-path", "m",
                                         "--device", "cpu", "--port", "31000"]), {})
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert cmd[3:] == ["--model-path", "m", "--device", "cpu", "--port", "31000", "--attention-backend",
                       "torch_native", "--max-total-tokens", "8192"]
    assert env["XSHARE_ENABLE"] == "1" and env["XSHARE_POLICY"] == "xshare" and env["XSHARE_BUDGET"] == "4"
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"


def test_user_arguments_win_and_gpu_launch_adds_nothing():
    cmd, _ = serve.build_launch(parse(["--model-path", "m", "--device=cpu", "--attention-backend", "intel_amx"]), {})
    assert cmd.count("--attention-backend") == 1 and "intel_amx" in cmd and "--max-total-tokens" in cmd
    cmd, env = serve.build_launch(parse(["--model-path", "m", "--tp", "2"]), {})
    assert cmd[3:] == ["--model-path", "m", "--tp", "2"] and "SGLANG_USE_CPU_ENGINE" not in env


def test_disable_keeps_the_plugin_loaded_but_off():
    _, env = serve.build_launch(parse(["--xshare-disable", "--model-path", "m"]), {})
    assert env["XSHARE_ENABLE"] == "0"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--xshare-policy", "nope"], "--xshare-policy / XSHARE_POLICY"),
        (["--xshare-budget", "0"], "--xshare-budget / XSHARE_BUDGET"),
        (["--xshare-budget", "2.5"], "--xshare-budget / XSHARE_BUDGET"),
        (["--xshare-warmup-k", "x"], "--xshare-warmup-k / XSHARE_WARMUP_K"),
        (["--xshare-bugdet", "3"], "--xshare-bugdet"),
    ],
)
def test_bad_options_are_refused_naming_them(argv, named):
    with pytest.raises(ValueError) as e:
        serve.build_launch(parse([*argv, "--model-path", "m"]), {})
    assert named in str(e.value)


def test_bad_environment_is_refused_naming_the_variable():
    with pytest.raises(ValueError, match="^XSHARE_MAX_TOKENS"):
        serve.build_launch(parse(["--model-path", "m"]), {"XSHARE_MIN_TOKENS": "9", "XSHARE_MAX_TOKENS": "3"})


def test_other_sglang_version_needs_an_explicit_override(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.6.0" if name == "sglang" else real(name))
    with pytest.raises(ValueError, match=r"sglang 0\.6\.0 is installed but xshare is pinned to sglang 0\.5\.23"):
        serve.build_launch(parse(["--model-path", "m"]), {})
    _, env = serve.build_launch(parse(["--xshare-allow-any-sglang", "--model-path", "m"]), {})
    assert env["XSHARE_ALLOW_ANY_SGLANG"] == "1"
    serve.build_launch(parse(["--model-path", "m"]), {"XSHARE_ALLOW_ANY_SGLANG": "1"})


def test_command_line_exit_code_and_message():
    r = subprocess.run([sys.executable, "-m", "xshare.cli", "serve", "--xshare-budget", "0", "--model-path", "m"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "xshare serve: --xshare-budget / XSHARE_BUDGET='0'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "xshare.cli", "serve", "--xshare-print-command", "--model-path", "m",
                        "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "SGLANG_USE_CPU_ENGINE=1" in r.stdout and "sglang.launch_server" in r.stdout


def test_cpu_thread_binding_for_several_ranks():
    assert serve.cpu_thread_binding(["--model-path", "m"], [0, 1]) is None
    assert serve.cpu_thread_binding(["--tp", "2"], [0, 1]) == "0|1"
    assert serve.cpu_thread_binding(["--tp-size", "2", "--dp", "2"], [0, 1]) == "0|1|0|1"
    assert serve.cpu_thread_binding(["--tensor-parallel-size=2"], list(range(8))) == "0-3|4-7"
    assert serve.cpu_thread_binding(["--tp", "3"], [0, 1, 2, 5, 6, 7, 8]) == "0-2|5-6|7-8"
    assert serve.cpu_thread_binding(["--tp", "2"], [0, 2, 4, 6]) == "0,2|4,6"
