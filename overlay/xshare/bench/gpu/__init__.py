"""``xshare bench gpu``: the prepared first-GPU check (one command, one JSON, one markdown table).

For a machine with one CUDA GPU where only torch, triton and numpy are installed and nothing can be
downloaded: every input is generated here or carried inside the repository. Four parts, in this
order, the report rewritten after each so that a run cut off still leaves the first parts:

1. **selector vs reference**: the fused Triton selector (``fused_select(backend='triton')``) against
   the torch reference ``select`` on the device, over the randomised cases of
   ``tests/test_kernel_interpret.py`` (:mod:`xshare.selection.kernels.cases`: both policies the kernel
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
   (:mod:`xshare.bench._routing`): kernel-level speed-up and the selector's share of the layer.

``--cpu`` runs the same code paths on the CPU at a tiny size (kernels in Triton's interpreter, CPU
"replays" re-launch the recorded launch, times by ``perf_counter``): CI runs it so the check cannot rot.
Needs torch, triton, numpy and this package only (tests/test_bench_gpu.py checks the imports).

The package, one responsibility per module (none imports this ``__init__``'s names, so there are no
cycles): :mod:`.cli` (``MODE``, ``HELP``, ``add_arguments``, ``run``, the argument checks),
:mod:`.context` (the parts, their shares of the time budget, the layer shapes, :class:`Context`),
:mod:`.runner` (``PART_FNS``; warm-up, then the parts in order, the report rewritten after each),
:mod:`.warmup` (kernels compiled in worker processes), :mod:`.correctness` (part 1), :mod:`.graphs`
(part 2), :mod:`.timing` (part 3 and the CUDA-graph / CUDA-event timing the parts share),
:mod:`.moe_layer` (part 4) and :mod:`.report` (the run's metadata and the markdown tables).
"""

from __future__ import annotations

from xshare.bench.gpu.cli import HELP, MODE, add_arguments, check_args, run
from xshare.bench.gpu.context import CPU_MOE_SHAPES, MOE_SHAPES, PART_END, PARTS, Context
from xshare.bench.gpu.correctness import part_selector_vs_reference, selector_cases
from xshare.bench.gpu.graphs import part_cuda_graph
from xshare.bench.gpu.moe_layer import part_moe_layer
from xshare.bench.gpu.report import markdown, meta
from xshare.bench.gpu.runner import PART_FNS, run_parts
from xshare.bench.gpu.timing import cuda_graph, part_selector_timing, selector_fns, time_call
from xshare.bench.gpu.warmup import warm

__all__ = [
    "CPU_MOE_SHAPES", "HELP", "MODE", "MOE_SHAPES", "PARTS", "PART_END", "PART_FNS", "Context", "add_arguments",
    "check_args", "cuda_graph", "markdown", "meta", "part_cuda_graph", "part_moe_layer", "part_selector_timing",
    "part_selector_vs_reference", "run", "run_parts", "selector_cases", "selector_fns", "time_call", "warm",
]
