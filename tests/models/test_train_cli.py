"""``xshare train-tiny``: train into a directory, --check (bit-for-bit retrain), --eval, --profile, bad input."""

import json

from conftest import require_module

require_module("transformers", "scripts/install_sglang_cpu.sh")

from xshare.cli import main  # noqa: E402
from xshare.models.store import MANIFEST, model_intact, read_manifest  # noqa: E402

SMALL = ["--set", "hidden_size=32", "--set", "head_dim=8", "--set", "num_layers=2", "--set", "num_experts=8",
         "--set", "top_k=2", "--set", "moe_intermediate_size=32", "--set", "steps=4", "--set", "batch_size=8",
         "--set", "warmup_steps=1", "--set", "threads=1"]


def _train(d, args, capsys):
    """Train a tiny model into ``d``: (the command's JSON output, the manifest it wrote)."""
    assert main(["train-tiny", "--model-dir", str(d), *args]) == 0
    return json.loads(capsys.readouterr().out), read_manifest(d)


def test_train_check_eval_profile(tmp_path, capsys):
    d = tmp_path / "model"
    out, man = _train(d, SMALL, capsys)
    assert out["state_sha256"] == man["state_sha256"] and out["parameters"] == man["parameters"]
    assert man["config"]["steps"] == 4 and man["config"]["num_experts"] == 8
    assert model_intact(d)

    assert main(["train-tiny", "--model-dir", str(d), "--check"]) == 0
    chk = json.loads(capsys.readouterr().out)
    assert chk["match"] and chk["expected"] == chk["got"] == man["state_sha256"]

    js = tmp_path / "eval.json"
    assert main(["train-tiny", "--model-dir", str(d), "--eval", "--policy", "off", "--policy", "xshare",
                 "--policy", "oea", "--oea-k0", "1", "--budget", "3", "--problems", "10", "--batch-size", "5",
                 "--json", str(js)]) == 0
    doc = json.loads(js.read_text())
    names = [r["name"] for r in doc["results"]]
    assert names == ["off", "xshare@3", "oea:k0=1"]
    off, xs = doc["results"][0], doc["results"][1]
    assert set(off["accuracy"]) == {"add", "reverse", "sort", "copy", "brackets", "overall"}
    assert "specialisation" in off and "specialisation" not in xs
    assert xs["selector"]["policy"] == "xshare" and xs["selector"]["budget"] == 3
    assert max(xs["decode"]["activated_per_layer"]) <= max(3, 5)  # budget, or the warm-up union (5 rows)

    pj = tmp_path / "profile.json"
    assert main(["train-tiny", "--model-dir", str(d), "--profile", "--batch-size", "4", "--json", str(pj)]) == 0
    prof = json.loads(pj.read_text())
    assert 0 < prof["eager"]["moe_share"] < 1 and prof["eager"]["batch"] == 4


def test_check_detects_a_different_model(tmp_path, capsys):
    d = tmp_path / "model"
    assert main(["train-tiny", "--model-dir", str(d), *SMALL]) == 0
    capsys.readouterr()
    man_path = d / MANIFEST
    man = json.loads(man_path.read_text())
    man["state_sha256"] = "0" * 64
    man_path.write_text(json.dumps(man))
    assert main(["train-tiny", "--model-dir", str(d), "--check"]) == 1
    assert json.loads(capsys.readouterr().out)["match"] is False


def test_bad_input_is_named_and_writes_nothing(tmp_path, capsys):
    d = tmp_path / "model"
    assert main(["train-tiny", "--model-dir", str(d), "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["train-tiny", "--model-dir", str(d), "--set", "top_k=99"]) == 2
    assert "top_k" in capsys.readouterr().err
    assert main(["train-tiny", "--model-dir", str(d), "--set", "steps"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert not d.exists()
    assert main(["train-tiny", "--model-dir", str(d), "--eval"]) == 2
    assert "no intact trained model" in capsys.readouterr().err
    assert main(["train-tiny", "--model-dir", str(d), "--check"]) == 2
    assert not d.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert main(["train-tiny", "--model-dir", str(foreign), *SMALL]) == 2
    assert "refusing" in capsys.readouterr().err
    assert main(["train-tiny", "--model-dir", str(foreign), "--force", *SMALL]) == 2
    assert (foreign / "keep.txt").read_text() == "x"
    assert main(["train-tiny", "--model-dir", str(d), "--eval", "--policy", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err


SMALL_AUXFREE = ["--router", "deepseek_v3", *SMALL, "--set", "n_group=4", "--set", "topk_group=2"]


def test_router_deepseek_v3_trains_the_aux_loss_free_model(tmp_path, capsys):
    d = tmp_path / "auxfree"
    out, man = _train(d, SMALL_AUXFREE, capsys)
    assert out["identity"] == man["identity"] and man["config"]["arch"] == "glm4_moe"
    assert man["config"]["router_aux_loss_coef"] == 0 and man["config"]["n_group"] == 4
    assert json.loads((d / "config.json").read_text())["architectures"] == ["Glm4MoeForCausalLM"]
    assert len(man["aux_losses"]) == 1 and man["aux_losses"][0] >= 1.0  # max/mean expert load
    # --check and --eval read the model's own config from the manifest (no --router needed)
    assert main(["train-tiny", "--model-dir", str(d), "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["match"]
    js = tmp_path / "eval.json"
    assert main(["train-tiny", "--model-dir", str(d), "--eval", "--policy", "off", "--policy", "xshare",
                 "--budget", "3", "--problems", "10", "--batch-size", "5", "--json", str(js)]) == 0
    doc = json.loads(js.read_text())
    assert [r["name"] for r in doc["results"]] == ["off", "xshare@3"]
    # a Qwen3-MoE-only setting is refused for this model, by name
    assert main(["train-tiny", "--model-dir", str(tmp_path / "x"), *SMALL_AUXFREE, "--set",
                 "router_aux_loss_coef=0.01"]) == 2
    assert "router_aux_loss_coef" in capsys.readouterr().err
