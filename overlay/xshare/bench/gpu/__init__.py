"""``xshare bench gpu``: the prepared first-GPU check (one command, one JSON, one markdown table).

For a machine with one CUDA GPU where only torch, triton and numpy are installed and nothing can be
downloaded: every input is generated here or carried inside the repository. Five parts, in this
order, the report rewritten after each so that a run cut off still leaves the first parts:

1. **selector vs reference**: the fused Triton selector (``select(backend='triton')``) against
   the torch reference ``select`` on the device, over the randomised cases of
   ``tests/selection/test_kernel_interpret.py`` (:mod:`xshare.selection.backends.triton.cases`: both policies the kernel
   implements, softmax and sigmoid routers, renormalisation on and off, plus the fixed cases), and
   ``--extra-cases`` more random seeds: ids identical, weights within 1e-6.
2. **CUDA graph**: the selector (kernel and torch) captured once with device knobs, ``num_tokens`` and
   placement; budget, warm-up, GPU cap, on/off, batch-size range, logits and ``num_tokens`` then
   changed in place and the graph replayed without recapture, each replay checked against an eager
   reference call.
3. **selector timing**: per MoE layer call, CUDA-graph replays of many calls between CUDA events,
   vanilla top-k vs the torch selector vs the fused kernel, over B x E x top_k.
4. **MoE layer**: the project's own fused-MoE Triton kernel (:mod:`xshare.bench._fused_moe`; SGLang's
   kernel cannot be loaded without SGLang's runtime) on the layer shapes of GPT-OSS-120B,
   Qwen3-235B-A22B (TP 8 slice) and DeepSeek-V3 (EP 8, the busiest GPU's 32 local experts), with
   vanilla routing vs the selector's routing of batches whose statistics are the ESFT traces'
   (:mod:`xshare.bench._routing`): kernel-level speed-up, the selector's share of the layer, and the
   speed-up with the served path's time per call (``speedup_served``, as part 5 measures it).
5. **served path**: the plugin's whole per-call routing as SGLang calls it,
   ``xshare.sglang.layer.route(runtime, args, topk_config)`` with the routing hook's arguments and a
   stand-in of SGLang's ``TopKConfig`` (SGLang cannot be installed there), captured in a CUDA graph with
   the runtime in its capturing state, then replayed, for every router family (Qwen3-235B, GPT-OSS-120B,
   DeepSeek-V3 with its fused shared slot, GLM-4.5, Kimi-K2, DeepSeek-V2, Llama-4) at B 1, 16, 64, against
   the family's vanilla gate in a CUDA graph; replays on new inputs checked against an eager call (decide's
   torch backend where it has that switch); a call the plugin leaves to SGLang is reported with its reason.

``--cpu`` runs the same code paths on the CPU at a tiny size (kernels in Triton's interpreter, CPU
"replays" re-launch the recorded launch or call again in the capturing state, times by ``perf_counter``):
CI runs it so the check cannot rot. Needs torch, triton, numpy and this package only (tests/bench/test_bench_gpu.py
checks the imports; the plugin's routing modules import SGLang only lazily, where it exists). By default
(--time-budget 260 s on a GPU) the whole check ends within 5 minutes on an H200.

The package, one responsibility per module (none imports this ``__init__``'s names, so there are no
cycles): :mod:`.cli` (``MODE``, ``HELP``, ``add_arguments``, ``run``, the argument checks),
:mod:`.context` (the parts, their shares of the time budget, the layer shapes, the router families,
:class:`Context`),
:mod:`.runner` (``PART_FNS``; warm-up, then the parts in order, the report rewritten after each),
:mod:`.warmup` (kernels compiled in worker processes), :mod:`.correctness` (part 1), :mod:`.graphs`
(part 2), :mod:`.timing` (part 3 and the CUDA-graph / CUDA-event timing the parts share),
:mod:`.moe_layer` (part 4), :mod:`.standins` (the stand-in ``TopKConfig``, the vanilla gates), :mod:`.served`
(part 5: the served call and its measurement, shared with part 4), :mod:`.reference` (part 5's eager
reference and the comparison of answers) and :mod:`.report` (the run's metadata and the
markdown tables).
"""

from __future__ import annotations

from xshare.bench.gpu.cli import HELP, MODE, add_arguments, check_args, run
from xshare.bench.gpu.context import (
    CPU_MOE_SHAPES,
    CPU_SERVED_FAMILIES,
    MOE_SHAPES,
    PART_END,
    PARTS,
    SERVED_FAMILIES,
    Context,
)
from xshare.bench.gpu.correctness import part_selector_vs_reference, selector_cases
from xshare.bench.gpu.graphs import part_cuda_graph
from xshare.bench.gpu.moe_layer import part_moe_layer
from xshare.bench.gpu.report import markdown, meta
from xshare.bench.gpu.runner import PART_FNS, run_parts
from xshare.bench.gpu.served import ServedCall, part_served_path
from xshare.bench.gpu.standins import TopKConfigStandIn, vanilla_gate
from xshare.bench.gpu.timing import cuda_graph, part_selector_timing, selector_fns, time_call
from xshare.bench.gpu.warmup import warm

__all__ = [
    "CPU_MOE_SHAPES", "CPU_SERVED_FAMILIES", "HELP", "MODE", "MOE_SHAPES", "PARTS", "PART_END", "PART_FNS",
    "SERVED_FAMILIES", "Context", "ServedCall", "TopKConfigStandIn", "add_arguments", "check_args", "cuda_graph",
    "markdown", "meta", "part_cuda_graph", "part_moe_layer", "part_selector_timing", "part_selector_vs_reference",
    "part_served_path", "run", "run_parts", "selector_cases", "selector_fns", "time_call", "vanilla_gate", "warm",
]
