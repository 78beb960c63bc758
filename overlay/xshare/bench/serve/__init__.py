"""``xshare bench serve``: the selector inside a real SGLang server, off vs every policy and budget.

One server build, one run: the server starts once with the plugin loaded, the selector off and the
admin endpoint on (``XSHARE_ADMIN_TOKEN``); every setting is switched in at runtime with ``PUT
/xshare/config`` (docs/sglang.md), so all settings share the process, the weights, the KV pool and
the machine's state. For each setting, 16 clients (threads) send held-out problems of
:mod:`xshare.models.tasks` greedily (temperature 0, ``max_new_tokens`` = longest answer + EOS), in
waves: each client sends one request per wave and the next wave starts when the wave is answered,
so every wave is one prefill then batched decode. The same problems go to every setting, and the
settings are visited in an interleaved order for ``--rounds`` rounds (off first in each round,
then the others; each round in a shifted order) to spread CPU noise over all of them.

Figures per setting (pooled over rounds):

* ``decode_tokens_per_s`` = clients x (decode tokens / decode seconds) over the requests, from each
  response's ``meta_info`` (decode tokens = completion tokens - 1, decode seconds = ``e2e_latency`` -
  ``first_token_latency``): the output rate of ``clients`` concurrent streams once their first token
  is out (= clients / time per output token). ``tokens_per_s`` = completion tokens / wall time of
  the waves (prefill included). Both with their ratio to ``off``.
* ``activated_per_layer``: mean activated experts per MoE layer per decode forward, from the
  server's ``/metrics`` (``xshare:active_experts`` histogram sum / count, difference over the
  setting's waves); ``vanilla_per_layer``: what SGLang's own top-k would have activated on the same
  rows (``xshare:vanilla_active_experts``). With the selector off the plugin records nothing; the
  ``off`` row shows the vanilla figures of the enabled settings' batches (and ``topk`` measures
  them directly).
* ``peak_gpu_experts``: under a simulated EP placement (``XSHARE_SIM_GPUS``, experts placed
  contiguously over ``--sim-gpus`` virtual GPUs), the most experts any one GPU must run per layer
  per decode forward, mean over forwards (``xshare:peak_gpu_active_experts``), and the same for
  vanilla top-k: the straggler GPU bounds an EP layer's time.
* ``accuracy``: exact match per task and overall (:func:`xshare.models.tasks.accuracy`).

Results: JSON (``--out DIR``/serve.json) and ``accuracy_vs_experts.png`` / ``speed_vs_experts.png``.

Modules: :mod:`.grid` (the settings of the sweep), :mod:`.server` (the model and the server),
:mod:`.client` (its HTTP endpoints), :mod:`.metrics` (``/metrics`` parsing and per-setting figures),
:mod:`.waves` (the load generator: one batch of requests in waves), :mod:`.sweep` (every setting,
interleaved rounds), :mod:`.report` (table and plots), :mod:`.cli` (``xshare bench serve``).
"""

from __future__ import annotations

from xshare.bench.serve.cli import add_arguments, run

MODE = "serve"
HELP = "a real SGLang server: selector off vs policies and budgets (tokens/s, experts, exact match)"

__all__ = ["HELP", "MODE", "add_arguments", "run"]
