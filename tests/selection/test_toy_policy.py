"""Adding a policy is one new file: a toy policy, written by this test into a module of its own,
runs through select(), `xshare eval`, the server adapter's routing decision, the admin endpoint's
validation and `xshare bench serve`'s settings, with no other file touched.

The module goes into a temporary folder that is added to the policies package's search path (the
registry discovers every module there), in a fresh interpreter, so the repository stays as it is.
"""

import json
import subprocess
import sys
import textwrap

TOY = '''
"""``toy_low``: keeps the m lowest-index experts (a test's toy set policy)."""

import torch
from torch import Tensor

from xshare.selection.common import Batch
from xshare.selection.registry import Policy, register_policy


@register_policy
class ToyLow(Policy):
    name = "toy_low"
    summary = "the m lowest-index experts"
    knobs = ("budget",)
    extra_knobs = ("toy_reject",)
    color = "tab:pink"

    def validate_config(self, config) -> None:
        if config.extra.get("toy_reject"):
            raise ValueError("extra['toy_reject'] refused by toy_low")

    def batch_set(self, batch: Batch) -> Tensor:
        return torch.arange(batch.num_experts, device=batch.scores.device) < batch.budget
'''

DRIVER = r'''
import json, sys, types
import torch
import xshare.selection.policies as policies
policies.__path__.append(sys.argv[1])
out = {}

from xshare.selection import SelectorConfig, available_policies, select
out["registered"] = "toy_low" in available_policies()

# select()
g = torch.Generator().manual_seed(0)
logits = torch.randn(12, 16, generator=g)
r = select(logits, 4, SelectorConfig(policy="toy_low", budget=6, warmup_k=0))
out["select_max_id"] = int(r.topk_ids.max())
out["select_active"] = int(r.active.sum())

# the server adapter's routing decision (both the C fast path and the torch path)
from xshare.sglang import layer
from xshare.sglang import state as rt
from xshare.sglang.settings import PluginSettings
topk_config = types.SimpleNamespace(top_k=4, num_shared_topk_slots=0, allow_routed_experts_capture=True,
    scoring_func="softmax", renormalize=True, custom_routing_function=None, correction_bias=None,
    use_grouped_topk=False, num_expert_group=None, topk_group=None, routed_scaling_factor=None)
w, ids = torch.topk(torch.softmax(logits, -1), 4, dim=-1)
for cpu_kernel in (True, False):
    runtime = rt.ProcessState(PluginSettings(enabled=True, cpu_kernel=cpu_kernel,
                                        selector=SelectorConfig(policy="toy_low", budget=6, warmup_k=0)))
    runtime.push(rt.ForwardState(mode="decode"))
    args = {"topk_ids": ids.clone(), "topk_weights": w / w.sum(-1, keepdim=True), "router_logits": logits,
            "layer_id": 0, "num_token_non_padded": None}
    res = layer.route(runtime, args, topk_config=topk_config)
    out[f"server_max_id_{cpu_kernel}"] = int(res["topk_ids"].max())
    out[f"server_fallbacks_{cpu_kernel}"] = runtime.stats.snapshot()["fallbacks_total"]

# the admin endpoint's validation
from xshare.sglang.admin import ConfigInvalid, ConfigUpdate, build_config
from xshare.selection.types import ModelShape
from xshare.sglang.admin.config import CONFIG_FIELDS
cur = {**{k: v for k, v in SelectorConfig().to_dict().items() if k in CONFIG_FIELDS}, "enabled": True}
body = ConfigUpdate.model_validate({"policy": "toy_low", "budget": 6}).model_dump(exclude_unset=True)
out["admin_policy"] = build_config(cur, body, replace_all=False, model=ModelShape(16, 4))["policy"]
try:
    build_config(cur, {"policy": "toy_low", "extra": {"toy_reject": 1}}, replace_all=False, model=ModelShape(16, 4))
    out["admin_refused"] = None
except ConfigInvalid as exc:
    out["admin_refused"] = exc.field

# xshare bench serve's settings
from xshare.bench.serve.grid import build_settings
grid = build_settings(["toy_low"], [0.25, 0.5], [1], include_topk=False)
out["bench_settings"] = [(s.name, s.body()) for s in grid if s.policy == "toy_low"]

# xshare eval
from xshare.cli import main
from xshare.eval.synth import write_synthetic_trace
trace = write_synthetic_trace(sys.argv[1] + "/t.npz", num_experts=16, top_k=4)
rc = main(["eval", "--trace", trace, "--batch", "4", "--gpus", "4", "--policy", "toy_low", "--policy", "topk",
           "--budget", "6", "--json", sys.argv[1] + "/r.json", "--no-progress"])
rows = json.load(open(sys.argv[1] + "/r.json"))["results"]
out["eval_rc"] = rc
out["eval_rows"] = {r["label"]: r["active_experts_mean"] for r in rows}
print("RESULT " + json.dumps(out))
'''


def test_a_toy_policy_in_one_new_module_runs_everywhere(tmp_path):
    (tmp_path / "toy_low.py").write_text(textwrap.dedent(TOY))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["registered"]
    assert out["select_max_id"] < 6 and out["select_active"] <= 6
    for cpu_kernel in ("True", "False"):
        assert out[f"server_max_id_{cpu_kernel}"] < 6, out
        assert out[f"server_fallbacks_{cpu_kernel}"] == 0, out
    assert out["admin_policy"] == "toy_low"
    assert out["admin_refused"] == "extra"
    bodies = [body for _, body in out["bench_settings"]]
    assert [b["budget"] for b in bodies] == [0.25, 0.5] and all(b["policy"] == "toy_low" for b in bodies)
    assert out["eval_rc"] == 0
    toy = [v for k, v in out["eval_rows"].items() if k.startswith("toy_low")]
    topk = [v for k, v in out["eval_rows"].items() if k.startswith("topk")]
    assert toy and topk and toy[0] <= 6 < topk[0]  # the toy keeps at most m = 6 experts per batch


def test_without_the_module_the_policy_is_unknown(tmp_path):
    code = "from xshare.selection import available_policies; print('toy_low' in available_policies())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "False"
