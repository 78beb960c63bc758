"""The selector's CPU fast path: ``xshare`` / ``topk`` routing of one layer in one C call, and the
routing of every other *set policy* (``lynx``, ``des_vote``, ``oea``: :meth:`Policy.batch_set`) once
the policy has picked its set in torch.

On the CPU a tensor op costs microseconds whatever its size, and the torch reference spends about
a hundred of them per layer (ranks, sets, routing, bookkeeping): ~0.4-0.8 ms, as much as a small
model's expert loop saves. ``_cpu_select.c`` does the same decision in one pass over the rows; the
gate scores, the column sums and the renormalised weights stay in torch, so the result is the
reference's bit for bit (tested against :func:`xshare.selection.select` with ``engine_ids``).

The C files are compiled at first use with the system C compiler (``$CC``, else ``cc``/``gcc``)
into one library in ``$XSHARE_CACHE_DIR/kernels`` (default ``~/.cache/xshare/kernels``), named by the
hash of the sources, their shared header ``_cpu_common.h`` and the compiler, and loaded with ctypes:
no Python or torch headers, no build step at install time. Without a compiler
:func:`cpu_kernel_available` is False (with the reason in
:func:`cpu_kernel_problem`) and callers use the torch reference.

    from xshare.selection.backends.c.kernel import cpu_route, cpu_kernel_supports
    out = cpu_route(router_logits, top_k, config, engine_ids=engine_ids, num_tokens=n, apply=True)
    out.routing            # Routing (ids int32, weights float32, active bool [E])
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from xshare.selection.backends.reference import prepare_batch
from xshare.selection.call import Decision, LayerCall
from xshare.selection.common import RENORMALIZE_EPS, fixed_point_totals, gate_scores
from xshare.selection.config import SelectorConfig
from xshare.selection.registry import Policy, get_policy
from xshare.selection.types import Routing

SOURCE = Path(__file__).with_name("_cpu_select.c")
# every C file of the library: the plain kernel, and the router-spec one (xshare.selection.backends.c.router)
SOURCES = (SOURCE, Path(__file__).with_name("_cpu_router.c"))
# the header both include (return codes, the routines they share): hashed into the cache key with them
HEADER = Path(__file__).with_name("_cpu_common.h")
CACHE_ENV = "XSHARE_CACHE_DIR"
_ERRORS = {-2: "engine_ids holds an expert id > E", -3: "an expert id is out of range", -4: "out of memory",
           -5: "NaN or +inf logits"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_problem: str | None = None
_loaded = False

_P = ctypes.c_void_p
_I = ctypes.c_int


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "xshare") / "kernels"


def _build(cc: str) -> Path:
    src = b"".join(path.read_bytes() for path in (*SOURCES, HEADER))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    tag = hashlib.sha256(src + cc.encode() + version.encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"cpu_select-{tag}.so"
    if lib.is_file():
        return lib
    with open(out_dir / ".build.lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)  # several scheduler processes may start at once
        if lib.is_file():
            return lib
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            # no contracted multiply-adds: the weights must round as torch rounds them, step by step
            flags = ["-O2", "-std=c99", "-ffp-contract=off", "-shared", "-fPIC"]
            proc = subprocess.run([cc, *flags, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-800:]}")
            os.replace(tmp, lib)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _problem, _loaded
    if _loaded:  # the hot path: no lock once the first attempt is over
        return _lib
    with _lock:
        if not _loaded:
            _lib, _problem = _open()
            _loaded = True  # set last: a lock-free reader never sees a half-done attempt
        return _lib


def _open() -> tuple[ctypes.CDLL | None, str | None]:
    """Build (or find in the cache) and load the library: (library, None) or (None, why not)."""
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (set CC, or install gcc)"
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, f"building {SOURCE.name} failed: {exc}"
    lib.xshare_cpu_plain.argtypes = [_I, _I, _I, _P]
    lib.xshare_cpu_plain.restype = _I
    lib.xshare_cpu_route.argtypes = [_I, _I, _I, _I, _P, _P, _P, _P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P]
    lib.xshare_cpu_route.restype = _I
    lib.xshare_cpu_figures.argtypes = [_I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _P, _P]
    lib.xshare_cpu_figures.restype = _I
    lib.xshare_cpu_topk.argtypes = [_I, _I, _I, _I, _P, _P]
    lib.xshare_cpu_topk.restype = _I
    lib.xshare_cpu_router_scores.argtypes = [_I, _I, _P, _P, _P, _I, _P]
    lib.xshare_cpu_router_scores.restype = _I
    lib.xshare_cpu_router.argtypes = [_I, _I, _I, _I, _I, _P, _P, _P, _P, _I, _I, _I, _I, _P, _P, _I, _I, _I,
                                      ctypes.c_float, _I, _I, _P, _P, _P, _P, _P, _P, _P]
    lib.xshare_cpu_router.restype = _I
    lib.xshare_cpu_router_served.argtypes = [_I, _I, _I, _I, _I, _P, _P, _I, _I, _I, _I, _I, _P, _I, _I, _I, _I, _P,
                                             _P, _P, _I, ctypes.c_float, _I, ctypes.c_float, ctypes.c_float, _P, _P,
                                             _P, _P, _P, _P, _P, _I, _P]
    lib.xshare_cpu_router_served.restype = _I
    return lib, None


def library() -> ctypes.CDLL:
    """The loaded C library (RuntimeError saying why when it is unavailable)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"CPU selector kernel unavailable: {_problem}")
    return lib


def kernel_error(rc: int) -> str:
    """The message of a C entry point's non-zero return code."""
    return f"CPU selector kernel: {_ERRORS.get(rc, f'error {rc}')}"


def cpu_kernel_available() -> bool:
    """Whether the C fast path is built and loaded (builds it on the first call)."""
    return _load() is not None


def cpu_kernel_problem() -> str | None:
    """Why the fast path is not available (None when it is, or before the first attempt)."""
    _load()
    return _problem


def c_decides(policy: Policy, config: SelectorConfig | None = None) -> bool:
    """The C code computes this policy's whole decision (``'cpu' in Policy.kernels``). The C set is
    XShare's budget fill: with a mass target, the set is chosen in torch and only the routing in C."""
    return "cpu" in policy.kernels and (config is None or config.target_mass is None or policy.vanilla)


def routable_set_policy(name: str) -> Policy | None:
    """The policy if it is a set policy the C routing can finish (it overrides ``batch_set`` and
    needs no placement), else None."""
    policy = get_policy(name)
    if not policy.is_set_policy or policy.needs_placement:
        return None
    return policy


def cpu_kernel_supports(config: SelectorConfig, router_logits: Tensor, groups: Tensor | None = None) -> bool:
    """Whether :func:`cpu_route` implements this call: CPU tensors, no request groups, and the
    policy is one the C code decides itself (``Policy.kernels``) or another set policy (its set in
    torch, the rest in C)."""
    return ((c_decides(get_policy(config.policy)) or routable_set_policy(config.policy) is not None)
            and router_logits.device.type == "cpu" and groups is None
            and router_logits.ndim == 2 and router_logits.shape[1] >= 1)


@dataclass
class CpuRouting:
    """What one :func:`cpu_route` call gives: the routing and the adapter's per-call figures."""

    routing: Routing
    scores: Tensor  # float32 [T, E] gate scores (0 where unusable)
    logits: Tensor  # float32 [T, E] contiguous
    engine_ids: Tensor | None  # int32 [T, k] contiguous (the engine's own top-k)
    in_set: Tensor  # bool [E]: the policy's set S (all False when it did not apply)
    vanilla_active: Tensor  # bool [E]: experts of ``engine_ids`` on valid rows
    changed_tokens: int  # valid rows whose expert set differs from ``engine_ids``
    checksum: int  # order-sensitive digest of the ids over valid rows, computed in the same pass
    num_valid: int

    def active_counts(self) -> tuple[int, int]:
        """(activated experts, activated experts of the engine's own picks) of the call, as host ints."""
        return int(self.routing.active.sum()), int(self.vanilla_active.sum())


def ptr(t: Tensor | None) -> int | None:
    """The data pointer of ``t`` for a C argument (None: NULL)."""
    return None if t is None else t.data_ptr()


def contiguous_int32(engine_ids: Tensor | None) -> Tensor | None:
    """The engine's picks int [T, k] as the C code reads them (int32, contiguous), or None for none."""
    if engine_ids is None or not engine_ids.numel():
        return None
    return (engine_ids if engine_ids.dtype == torch.int32 else engine_ids.to(torch.int32)).contiguous()


def cpu_route(router_logits: Tensor, top_k: int, config: SelectorConfig, *, engine_ids: Tensor | None = None,
              num_tokens: int | Tensor | None = None, apply: bool | None = None,
              budget: int | None = None, warmup_k: int | None = None) -> CpuRouting:
    """The routing of :func:`xshare.selection.select` (same ``engine_ids`` and ``num_tokens``) on CPU
    tensors, for a policy :func:`cpu_kernel_supports` accepts. ``apply`` overrides the batch-size gate
    (default: ``config.applies_to(valid rows)``); ``budget`` / ``warmup_k`` override the config's
    (host values: the CPU has no graphs to keep them in device tensors for). Shapes and types are
    the caller's to check (:func:`xshare.selection.checks.check_inputs`); raises RuntimeError if the
    fast path is not available or the call fails."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"CPU selector kernel unavailable: {_problem}")
    num_rows, num_experts = router_logits.shape
    n_valid = num_rows if num_tokens is None else max(0, min(num_rows, int(num_tokens)))
    if apply is None:
        apply = config.applies_to(n_valid)
    apply = bool(apply) and not get_policy(config.policy).vanilla
    m = config.budget_for(num_experts) if budget is None else int(budget)
    k0 = config.warmup_k if warmup_k is None else int(warmup_k)
    given_set = None
    cap_bound = None  # set policies with a mass target note it on their batch
    if apply and not c_decides(get_policy(config.policy), config):
        policy = routable_set_policy(config.policy)
        if policy is None:
            raise ValueError(f"policy {config.policy!r} is not a set policy: the CPU kernel cannot route it")
        # the policy picks its set in torch, on the batch the reference builds; C routes
        batch = prepare_batch(LayerCall(router_logits, top_k, engine_ids=engine_ids,
                                        num_tokens=None if num_tokens is None else n_valid), config)
        if budget is not None or warmup_k is not None:
            batch = dataclasses.replace(batch, budget=m, warmup_k=k0)
        given_set = policy.batch_set(batch).contiguous()
        cap_bound = batch.cap_bound
        logits, scores = batch.logits.contiguous(), batch.scores.contiguous()
    else:
        logits = router_logits.float().contiguous()
        softmax = config.scoring == "softmax"
        if lib.xshare_cpu_plain(num_rows, num_experts, int(softmax), logits.data_ptr()) == 0:
            # finite or -inf logits: the plain softmax / sigmoid is gate_scores bit for bit
            scores = torch.softmax(logits, dim=-1) if softmax else torch.sigmoid(logits)
        else:
            scores = gate_scores(logits, torch.isfinite(logits), config.scoring).contiguous()
    if not apply or given_set is not None:
        colsum = scores  # not read
    else:  # the reference's fixed-point sums (as float64 integers: C only compares them), ties as everywhere
        colsum = fixed_point_totals(scores, None if n_valid == num_rows else torch.arange(num_rows) < n_valid)
        colsum = colsum.to(torch.float64)
    pref = contiguous_int32(engine_ids)
    ids = torch.empty(num_rows, top_k, dtype=torch.int32)
    flags = torch.empty(3, num_experts, dtype=torch.bool)  # S, active, vanilla active
    counts = (ctypes.c_int64 * 2)()
    base = flags.data_ptr()
    rc = lib.xshare_cpu_route(num_rows, num_experts, top_k, 0 if pref is None else pref.shape[1], logits.data_ptr(),
                              scores.data_ptr(), colsum.data_ptr(), ptr(pref), n_valid, int(apply), m, k0,
                              ptr(given_set), ids.data_ptr(), base, base + num_experts, base + 2 * num_experts, counts)
    if rc != 0:
        raise RuntimeError(kernel_error(rc))
    weights = scores.gather(1, ids.long())
    if config.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True, dtype=torch.float32) + RENORMALIZE_EPS)
    in_set, active, vanilla_active = flags.unbind(0)
    return CpuRouting(routing=Routing(topk_ids=ids, topk_weights=weights, active=active, physical_ids=None,
                                      cap_bound=cap_bound),
                      scores=scores, logits=logits, engine_ids=pref, in_set=in_set, vanilla_active=vanilla_active,
                      changed_tokens=counts[0], checksum=counts[1], num_valid=n_valid)


def decide_cpu(call: LayerCall, config: SelectorConfig, checkpoint: Callable[[], None] | None = None) -> Decision:
    """The decision for a plain layer call :func:`cpu_kernel_supports` accepts (``config`` with the layer's
    scoring applied), by :func:`cpu_route`; ``Decision.cpu`` holds the by-products the adapter records."""
    if checkpoint is not None:
        checkpoint()
    res = cpu_route(call.router_logits, call.top_k, config, engine_ids=call.engine_ids, num_tokens=call.num_tokens)
    return Decision(res.routing, config, cpu=res)
