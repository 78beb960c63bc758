"""The one entry of the selection core: :func:`decide` routes one MoE layer call
(:class:`~xshare.selection.call.LayerCall`: router logits float [T, E], the engine's own picks
``engine_ids`` int [T, k], padding, placement, knobs, ...) under a
:class:`~xshare.selection.config.SelectorConfig` and returns a :class:`~xshare.selection.call.Decision`
(ids int32 [T, k], weights float32 [T, k], active experts bool [E], and what routed it).

The SGLang adapter, the routing override used for offline accuracy (``xshare.models``), ``xshare eval``'s
replay and :func:`xshare.selection.select` all build a ``LayerCall`` and call :func:`decide`; nothing else
in them knows how a policy, a backend or DeepEP's global mode works.

Backends (:mod:`xshare.selection.backends`), picked per call by :func:`choose_backend`: the fused Triton
kernels for CUDA tensors, the C kernel for CPU tensors, and the torch reference wherever the wanted one
does not implement the call (with the reason), or as ``config.backend`` forces (``XSHARE_BACKEND``).

Pure torch (DeepEP global mode reaches torch.distributed only through the ``all_reduce`` callable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from xshare.selection.backends.c.kernel import cpu_kernel_supports, decide_cpu
from xshare.selection.backends.c.router import decide_router_c, decide_served, served_supports
from xshare.selection.backends.global_mode import decide_global
from xshare.selection.backends.reference import decide_plain
from xshare.selection.backends.reference_router import decide_router
from xshare.selection.backends.triton.launch import kernel_problem
from xshare.selection.backends.triton.route import decide_fused
from xshare.selection.call import Decision, LayerCall, LayerRouting, layer_config, plain_layer
from xshare.selection.config import SelectorConfig
from xshare.selection.registry import get_policy
from xshare.selection.routers.spec import RouterSpec

BACKENDS = ("auto", "triton", "c", "torch")


def uses_cpu_kernel(call: LayerCall, config: SelectorConfig) -> bool:
    """Whether the C fast path implements this plain-layer call (CPU tensors, a policy it routes, no
    groups it would need, no group-wide statistics, no exact rows)."""
    if call.all_reduce is not None or call.exact is not None:
        return False
    return cpu_kernel_supports(config, call.router_logits, call.groups_for(get_policy(config.policy)))


def _wanted(backend: str, device_type: str) -> tuple[str, str | None]:
    """(the backend ``backend`` asks for on a ``device_type`` device, None), or ('torch', why) where it
    cannot be had there: 'auto' is the fused kernels on CUDA and the C kernel on the CPU."""
    if backend == "auto":
        backend = {"cuda": "triton", "cpu": "c"}.get(device_type, "torch")
        if backend == "torch":
            return "torch", f"device_{device_type}"
    if backend == "c" and device_type != "cpu":
        return "torch", "c_needs_cpu_tensors"
    return backend, None


def choose_backend(call: LayerCall, config: SelectorConfig, *, cpu_kernel: bool = False,
                   backend: str | None = None) -> tuple[str, str | None]:
    """(backend, reason): what routes ``call`` under ``config.backend`` (or ``backend`` where given), and
    why the torch reference does where another backend was wanted (None otherwise). The one place a
    backend is picked.

    'auto' wants the fused Triton kernel for CUDA tensors and the C kernel for CPU tensors; 'triton'
    and 'c' force one (Triton on CPU tensors runs interpreted: tests). A call the wanted backend does
    not implement goes to the torch reference, with the reason (:func:`~xshare.selection.backends.
    triton.launch.kernel_problem` for Triton; for C the call is tried and the reason is 'c_unsupported'
    when the kernel declines it). ``cpu_kernel``: the caller's word that the C kernel is built and host
    work is allowed. Host values only: never reads a tensor.
    """
    logits = call.router_logits
    want, reason = _wanted(config.backend if backend is None else backend, logits.device.type)
    if want == "torch":
        return "torch", reason
    if want == "c":
        return ("c", None) if cpu_kernel else ("torch", "c_unavailable")
    layer = (plain_layer(call.layer) or call.layer) if isinstance(call.layer, RouterSpec) else call.layer
    problem = kernel_problem(logits, call.top_k, layer, config, engine_ids=call.engine_ids, placement=call.placement,
                             global_mode=call.all_reduce is not None,
                             groups=call.groups_for(get_policy(config.policy)))
    return ("triton", None) if problem is None else ("torch", problem)


def planned_backend(config: SelectorConfig, device_type: str, *, cpu_kernel: bool = True) -> str:
    """The backend calls of a layer are expected to take under ``config`` on a ``device_type`` device
    ('triton', 'c' or 'torch', with the reason in parentheses where torch routes although another
    was wanted): what the start-up report says. A call may still go to the reference for a reason of
    its own (:func:`choose_backend`: a layer shape or dtype the kernel refuses), counted per layer."""
    want, reason = _wanted(config.backend, device_type)
    if want == "triton" and "triton" not in get_policy(config.policy).kernels:
        want, reason = "torch", f"policy_{config.policy}"
    elif want == "c" and not cpu_kernel:
        want, reason = "torch", "c_unavailable"
    return want if reason is None else f"{want} ({reason})"


def gate_deferrable(call: LayerCall, config: SelectorConfig, *, cpu_kernel: bool = False,
                    backend: str | None = None) -> bool:
    """Whether the backend :func:`choose_backend` picks for ``call`` computes the layer's gate itself, so
    that the engine may skip its own (``call`` with ``engine_gate`` set, no engine picks or outputs): the
    C kernel's served path of grouped and biased-grouped gates (:func:`~xshare.selection.backends.c.
    router.served_supports`). Host values only."""
    return _computes_gate(call, config, choose_backend(call, config, cpu_kernel=cpu_kernel, backend=backend)[0])


def _computes_gate(call: LayerCall, config: SelectorConfig, chosen: str) -> bool:
    """:func:`gate_deferrable` for the backend already chosen."""
    if not call.engine_gate or chosen != "c" or not isinstance(call.layer, RouterSpec) \
            or plain_layer(call.layer) is not None:
        return False
    return served_supports(call, layer_config(config, call.layer))


def decide(call: LayerCall, config: SelectorConfig, *, cpu_kernel: bool = False,
           checkpoint: Callable[[], None] | None = None, backend: str | None = None) -> Decision:
    """The routing of one MoE layer call under ``config`` (the layer's scoring is applied here), by the
    backend :func:`choose_backend` picks (``Decision.backend``, ``Decision.reason``).

    cpu_kernel   the C fast path may route the call when it implements it (:func:`uses_cpu_kernel`);
                 the caller says whether the kernel is built and whether host work is allowed (not
                 under CUDA-graph capture).
    checkpoint   called once at the point where a failure leaves nothing half done (after DeepEP
                 global mode's all-reduce, before any routing): fault injection for tests.
    backend      overrides ``config.backend`` for this call (one of :data:`BACKENDS`), or None.

    A layer described by a :class:`~xshare.selection.routers.spec.RouterSpec` (biased and grouped
    routers: DeepSeek-V3, GLM-4.5, Kimi-K2, DeepSeek-V2, Llama-4, sqrtsoftplus) is routed by
    :func:`~xshare.selection.backends.reference_router.decide_router` on the torch path.

    Raises ValueError for a config or call the core cannot route (among them a call with ``engine_gate``
    that no backend's gate takes: :func:`gate_deferrable`); the caller falls back.
    """
    chosen, reason = choose_backend(call, config, cpu_kernel=cpu_kernel, backend=backend)
    if call.engine_gate:  # the engine skipped its gate: only the C served path computes it
        if not _computes_gate(call, config, chosen):
            raise ValueError("engine_gate: the engine skipped its gate but no backend computes this layer's gate "
                             "(the engine's picks are needed)")
        return dataclasses.replace(decide_served(call, layer_config(config, call.layer), checkpoint), backend="c")
    if chosen == "triton":
        if checkpoint is not None:
            checkpoint()
        return decide_fused(call, config)
    out = _decide_on_host(call, config, use_c=chosen == "c", checkpoint=checkpoint)
    if out.cpu is not None:
        return dataclasses.replace(out, backend="c")
    if chosen == "c":  # the C kernel declined the call
        reason = "c_unsupported"
    return out if reason is None else dataclasses.replace(out, reason=reason)


def _decide_on_host(call: LayerCall, config: SelectorConfig, *, use_c: bool,
                    checkpoint: Callable[[], None] | None) -> Decision:
    """The C kernel where ``use_c`` and it implements the call, else the torch reference (plain layers,
    DeepEP global mode, router specs)."""
    if isinstance(call.layer, RouterSpec):
        plain = plain_layer(call.layer)
        if plain is None:
            scores = None
            if use_c and call.all_reduce is None:
                decision, scores = decide_router_c(call, layer_config(config, call.layer), checkpoint)
                if decision is not None:
                    return decision
            return decide_router(call, config, checkpoint=checkpoint, scores=scores)
        call = dataclasses.replace(call, layer=plain)
    config = layer_config(config, call.layer)
    if call.all_reduce is not None:
        return decide_global(call, config, checkpoint)
    if use_c and uses_cpu_kernel(call, config):
        return decide_cpu(call, config, checkpoint)
    return decide_plain(call, config, checkpoint)


__all__ = ["BACKENDS", "Decision", "LayerCall", "LayerRouting", "choose_backend", "decide", "gate_deferrable",
           "layer_config", "planned_backend", "uses_cpu_kernel"]
