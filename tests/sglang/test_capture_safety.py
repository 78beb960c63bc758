"""Capture safety of the whole per-call path SGLang runs: no host<->device transfer, proven on the CPU.

Under CUDA-graph capture torch refuses two things the selector must therefore never do per call:
reading a device value on the host (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ``nonzero``)
and copying host data to the device (``torch.tensor(x, device=...)``, ``.to(device)`` of a CPU tensor,
``copy_`` from one). Eager, each of them is a blocking copy per layer.

:func:`forbid_host_transfers` watches every torch call twice, as a function mode (what Python asks
for: ``torch.tensor`` / ``as_tensor`` / ``asarray`` / ``new_tensor`` of host data onto a device,
which on ``meta`` reaches no aten op at all) and as a dispatch mode (what ATen runs: ``_to_copy`` and
``copy_`` across the host boundary, a device op fed a CPU tensor, ``lift_fresh`` of a device tensor,
``_local_scalar_dense`` / ``nonzero`` / ``equal`` / ``masked_select`` / ``is_nonzero`` on a device
tensor), and records each as a site (the selector's file and line that asked for it).
:func:`test_the_detector_catches_each_forbidden_pattern` shows every rule firing.

The proof then runs :func:`xshare.sglang.layer.route` as SGLang's ``_post_process_topk_ids`` hook
calls it (arguments bound as the hook binds them, SGLang's real ``TopKConfig``, a real ``ProcessState``
with metrics observed) on ``meta`` tensors (a device without data: any value read fails there too),
for every router family and every policy (and DeepEP global mode for its policies), inside a captured
forward and an eager one, and asserts no site was recorded, no fallback was counted and the call
returned a replacement (so an exception swallowed by the adapter cannot hide a site). The layer's
first call comes before, as SGLang's warm-up forwards come before capture: the per-layer device state
is built then, and the only transfer it may make is the one copy of the layer's placement, which is
then kept, and rewritten in place when EPLB rebalances (the placement tests at the end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import require_module
from xshare.selection import Placement, SelectorConfig, available_policies
from xshare.selection.backends.global_mode import global_policies
from xshare.sglang import layer as routing
from xshare.sglang import state as rt
from xshare.sglang.settings import PluginSettings

topk = require_module("sglang.srt.layers.moe.topk", "scripts/install_sglang_cpu.sh")
from sglang.srt.models.llama4 import Llama4MoE  # noqa: E402
from test_sglang_router_families import _cfg  # noqa: E402

DEVICE = "meta"
T = 16
_PACKAGE = str(Path(routing.__file__).resolve().parents[1])  # .../xshare
_TORCH = str(Path(torch.__file__).resolve().parent)


# -- the detector ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Transfer:
    kind: str  # "host->device" or "device->host"
    op: str  # the torch function or aten op
    site: str  # file:line (function) of the innermost xshare frame that asked for it

    def __str__(self) -> str:
        return f"{self.kind} {self.op} at {self.site}"


def _site() -> str:
    frames = [f for f in traceback.extract_stack()
              if not f.filename.startswith(_TORCH) and f.name not in ("_site", "__torch_function__",
                                                                      "__torch_dispatch__")]
    ours = [f for f in frames if f.filename.startswith(_PACKAGE)]
    frame = ours[-1] if ours else frames[-1]
    path = Path(frame.filename)
    name = str(path.relative_to(Path(_PACKAGE).parent)) if frame.filename.startswith(_PACKAGE) else path.name
    return f"{name}:{frame.lineno} ({frame.name})"


def _on_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


_CREATORS = {torch.tensor: "torch.tensor", torch.as_tensor: "torch.as_tensor", torch.asarray: "torch.asarray",
             torch.Tensor.new_tensor: "Tensor.new_tensor"}
_aten = torch.ops.aten
_READS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.equal.default,
          _aten.masked_select.default, _aten.is_nonzero.default}
_LIFTS = {_aten.lift_fresh.default, _aten.lift_fresh_copy.default}


class _Creations(TorchFunctionMode):
    """Host data turned into a device tensor by a factory (no aten op shows it on ``meta``)."""

    def __init__(self, log: list[Transfer]) -> None:
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _CREATORS.get(func)
        if name is not None and isinstance(out, torch.Tensor) and not _on_host(out):
            data = args[1] if func is torch.Tensor.new_tensor else (args[0] if args else kwargs.get("data"))
            if not isinstance(data, torch.Tensor):  # a Tensor source: the dispatch mode sees its copy
                self.log.append(Transfer("host->device", name, _site()))
        return out


class _Transfers(TorchDispatchMode):
    """ATen ops that move data across the host boundary, or read a device value on the host."""

    def __init__(self, log: list[Transfer]) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        kind = None
        if func in _READS:
            kind = "device->host" if any(not _on_host(t) for t in tensors) else None
        elif func in _LIFTS:
            kind = "host->device" if any(not _on_host(t) for t in tensors) else None
        elif func is _aten._to_copy.default:
            src = args[0]
            dst = kwargs.get("device") or src.device
            dst = torch.device(dst)
            if _on_host(src) and dst.type != "cpu":
                kind = "host->device"
            elif not _on_host(src) and dst.type == "cpu":
                kind = "device->host"
        elif func is _aten.copy_.default:
            dst, src = args[0], args[1]
            if _on_host(src) and not _on_host(dst):
                kind = "host->device"
            elif not _on_host(src) and _on_host(dst):
                kind = "device->host"
        elif any(_on_host(t) for t in tensors) and any(not _on_host(t) for t in tensors):
            kind = "host->device"  # a device op fed a host tensor (copied, or its value baked in)
        if kind is not None:
            self.log.append(Transfer(kind, str(func), _site()))
        return func(*args, **kwargs)


@contextlib.contextmanager
def forbid_host_transfers() -> Iterator[list[Transfer]]:
    """Record every host<->device transfer made inside the block (see the module docstring)."""
    log: list[Transfer] = []
    with _Creations(log), _Transfers(log):
        yield log


def _caught(fn) -> list[str]:  # noqa: ANN001
    with forbid_host_transfers() as log, contextlib.suppress(RuntimeError, NotImplementedError):
        fn()
    return [t.kind for t in log]


def test_the_detector_catches_each_forbidden_pattern():
    d = torch.zeros(3, device=DEVICE)
    h = torch.ones(3)
    h0 = torch.tensor(2.0)
    h2d = {
        "torch.tensor(x, device=)": lambda: torch.tensor(float("-inf"), dtype=torch.float32, device=DEVICE),
        "torch.as_tensor(int, device=)": lambda: torch.as_tensor(3, device=DEVICE),
        "torch.as_tensor(host tensor, device=)": lambda: torch.as_tensor(h, device=DEVICE),
        "torch.asarray(list, device=)": lambda: torch.asarray([1.0, 2.0], device=DEVICE),
        "Tensor.new_tensor": lambda: d.new_tensor([1, 2]),
        ".to(device)": lambda: h.to(DEVICE),
        ".to(device=, dtype=, non_blocking=)": lambda: h.to(device=DEVICE, dtype=torch.int64, non_blocking=True),
        "copy_ from host": lambda: d.clone().copy_(h),
        "slice assignment of a host tensor": lambda: d.clone().__setitem__(slice(None), h),
        "a device op fed a host 0-d tensor": lambda: d + h0,
        "torch.where with a host 0-d tensor": lambda: torch.where(d > 0, d, h0),
        "indexing with a host index": lambda: d[torch.tensor([0, 1])],
        "lift_fresh of a device tensor": lambda: torch.ops.aten.lift_fresh.default(d),
    }
    d2h = {
        ".item()": lambda: d[0].item(),
        "bool(t)": lambda: bool(d[0]),
        "int(t)": lambda: int(d[0]),
        ".tolist()": lambda: d.tolist(),
        ".cpu()": lambda: d.cpu(),
        "copy_ into host": lambda: h.clone().copy_(d),
        "nonzero": lambda: d.nonzero(),
        "torch.equal": lambda: torch.equal(d, d),
        "masked_select": lambda: d.masked_select(d > 0),
        "is_nonzero": lambda: torch.is_nonzero(d[:1]),
    }
    for name, fn in h2d.items():
        assert "host->device" in _caught(fn), name
    for name, fn in d2h.items():
        assert "device->host" in _caught(fn), name
    # what the selector may do: device factories, Python scalars, host-only work
    allowed = {
        "torch.full": lambda: torch.full((), float("-inf"), device=DEVICE),
        "new_full": lambda: d.new_full((), 1.0),
        "full_like": lambda: torch.full_like(d, 0.5),
        "a Python scalar operand": lambda: d + 1.0,
        "torch.where with a Python scalar": lambda: torch.where(d > 0, d, 0.0),
        "fill_": lambda: d.clone().fill_(3),
        "item assignment of a Python scalar": lambda: d.clone().__setitem__(0, 1.0),
        "a comparison with an int": lambda: torch.arange(3, device=DEVICE) < 2,
        "host-only work": lambda: torch.tensor(1.0).item(),
        "as_tensor of a tensor already there": lambda: torch.as_tensor(d, device=DEVICE),
    }
    for name, fn in allowed.items():
        assert _caught(fn) == [], name


def test_a_site_names_the_selectors_file_and_line():
    from xshare.selection.common import device_scalar, valid_rows

    with forbid_host_transfers() as log:
        valid_rows(4, 3, DEVICE)  # host numbers are filled on the device: no transfer
        device_scalar(0.9, DEVICE, torch.float32)
        Placement.contiguous(8, 2).to(DEVICE)  # a host-built placement copied over: one copy per tensor
    assert len(log) == 5 and {t.kind for t in log} == {"host->device"}
    assert all(t.site.startswith("xshare/selection/types.py:") for t in log), log


# -- the per-call path, every router family x every policy ----------------------------------------
FAMILIES = ["softmax", "sigmoid", "sqrtsoftplus", "minimax_m2", "deepseek_v2", "deepseek_v3", "glm45", "llama4"]


def _topk_config(family: str):  # noqa: ANN202
    """(SGLang TopKConfig with its tensors on DEVICE, E, routed top_k) of one router family."""
    if family in ("softmax", "sigmoid"):  # Qwen3-MoE / Mixtral / GPT-OSS: plain top-k
        return topk.TopKConfig(top_k=4, renormalize=True, torch_native=True, scoring_func=family), 32, 4
    if family == "llama4":
        return topk.TopKConfig(top_k=1, renormalize=False, torch_native=True,
                               custom_routing_function=Llama4MoE.custom_routing_function), 16, 1
    cfg, e, k = _cfg(family)  # sqrtsoftplus, biased plain (MiniMax-M2), DeepSeek-V2 / -V3, GLM-4.5 / Kimi-K2
    if cfg.correction_bias is not None:  # SGLang holds the bias on the layer's device
        cfg = dataclasses.replace(cfg, correction_bias=cfg.correction_bias.to(DEVICE))
    return cfg, e, k


def _hook_args(cfg, e: int, capturing: bool) -> dict:  # noqa: ANN001
    """The arguments of ``_post_process_topk_ids`` as the routing hook binds them (on DEVICE)."""
    width = cfg.top_k
    return {"topk_ids": torch.zeros(T, width, dtype=torch.int32, device=DEVICE),
            "topk_weights": torch.zeros(T, width, dtype=torch.float32, device=DEVICE),
            "topk_config": cfg, "router_logits": torch.zeros(T, e, dtype=torch.bfloat16, device=DEVICE),
            "layer_id": 3,
            # CUDA graphs pass the real row count as a device scalar; eager forwards pass None
            "num_token_non_padded": torch.full((), T - 3, dtype=torch.int32, device=DEVICE) if capturing else None,
            "expert_location_dispatch_info": None, "padded_rows_masked": False}


def _runtime(policy: str, e: int) -> rt.ProcessState:
    selector = SelectorConfig(policy=policy, budget=max(2, e // 4), warmup_k=1)
    runtime = rt.ProcessState(PluginSettings(enabled=True, selector=selector, sim_gpus=4))
    runtime.observe = True  # the per-call metrics window is written too
    return runtime


def _route_twice(runtime: rt.ProcessState, cfg, e: int, capturing: bool) -> tuple[list[Transfer], list[Transfer], dict]:  # noqa: ANN001
    """The layer's first call (the warm-up forward), then the call under test, both watched."""
    with forbid_host_transfers() as first:
        assert routing.route(runtime, _hook_args(cfg, e, capturing), cfg) is not None, dict(runtime.stats.fallbacks)
    args = _hook_args(cfg, e, capturing)
    with forbid_host_transfers() as second:
        out = routing.route(runtime, args, cfg)
    assert out is not None, dict(runtime.stats.fallbacks)  # applied: a swallowed exception would return None
    assert out["topk_ids"].device.type == DEVICE and out["topk_ids"].shape == args["topk_ids"].shape
    assert out["topk_weights"].shape == args["topk_weights"].shape
    return first, second, out


def _check_counters(runtime: rt.ProcessState) -> None:
    stats = runtime.stats  # its host counters (snapshot() would read the device sums)
    assert dict(stats.fallbacks) == {} and dict(stats.skipped) == {}, (stats.fallbacks, stats.skipped)
    assert stats.applied == 2 and stats.coverage == {3: "selects"}


def _only_the_placement_copy(transfers: list[Transfer]) -> bool:
    """The first call of a layer may copy its host-built placement to the device (once: then kept)."""
    return all(t.kind == "host->device" and t.op == "aten._to_copy.default"
               and t.site.startswith("xshare/selection/types.py:") for t in transfers)


@pytest.mark.parametrize("capturing", [True, False], ids=["captured", "eager"])
@pytest.mark.parametrize("policy", available_policies())
@pytest.mark.parametrize("family", FAMILIES)
def test_the_routing_hook_path_makes_no_host_transfer(family, policy, capturing):
    cfg, e, _ = _topk_config(family)
    runtime = _runtime(policy, e)
    # captured: the exact-routing rows come from the persistent buffer; eager: the forward's own mask
    exact = None if capturing else torch.zeros(T, dtype=torch.bool, device=DEVICE)
    runtime.push(rt.ForwardState(mode="decode", tokens_per_req=2, capturing=capturing, exact=exact))
    first, second, _ = _route_twice(runtime, cfg, e, capturing)
    assert not second, "\n".join(map(str, second))
    assert _only_the_placement_copy(first), "\n".join(map(str, first))
    _check_counters(runtime)


@pytest.mark.parametrize("capturing", [True, False], ids=["captured", "eager"])
@pytest.mark.parametrize("policy", available_policies())
@pytest.mark.parametrize("family", ["softmax", "sigmoid"])
def test_the_triton_kernel_runner_path_makes_no_host_transfer(family, policy, capturing):
    """SGLang's ``triton_kernel`` runner (GPT-OSS) routes from the logits alone: route_logits."""
    cfg, e, k = _topk_config(family)
    runtime = _runtime(policy, e)
    runtime.push(rt.ForwardState(mode="decode", tokens_per_req=2, capturing=capturing))
    layer = type("TopK", (), {"topk_config": cfg, "layer_id": 3})()
    rows = torch.full((), T - 3, dtype=torch.int32, device=DEVICE) if capturing else None
    logits = torch.zeros(T, e, dtype=torch.bfloat16, device=DEVICE)
    with forbid_host_transfers() as first:
        assert routing.route_logits(runtime, layer, logits, k, rows) is not None, dict(runtime.stats.fallbacks)
    with forbid_host_transfers() as second:
        ids = routing.route_logits(runtime, layer, logits, k, rows)
    assert not second, "\n".join(map(str, second))
    assert _only_the_placement_copy(first), "\n".join(map(str, first))
    assert ids is not None and ids.shape == (T, k) and ids.dtype == torch.int16 and ids.device.type == DEVICE
    _check_counters(runtime)


@pytest.mark.parametrize("capturing", [True, False], ids=["captured", "eager"])
@pytest.mark.parametrize("policy", global_policies())
@pytest.mark.parametrize("family", FAMILIES)
def test_deepep_global_mode_makes_no_host_transfer(family, policy, capturing):
    """DeepEP global mode: the set from the group's statistics (one all-reduce per call; a group of one
    rank here, whose sum is its own statistics), the settings as host values."""
    cfg, e, _ = _topk_config(family)
    runtime = _runtime(policy, e)
    runtime.settings = dataclasses.replace(runtime.settings, deepep_mode="global")
    reduced: list[tuple] = []
    runtime.scattered_input = True
    runtime.all_reduce = lambda t: reduced.append(tuple(t.shape)) or t
    runtime.push(rt.ForwardState(mode="decode", capturing=capturing, global_mode="decode", global_applies=True))
    first, second, _ = _route_twice(runtime, cfg, e, capturing)
    assert not second, "\n".join(map(str, second))
    assert _only_the_placement_copy(first), "\n".join(map(str, first))
    assert reduced == [(2 * e,)] * 2  # the global path ran, once per call
    _check_counters(runtime)


# -- the placement cache: one device copy per layer, rewritten in place by EPLB -------------------
def _expert_location(p2l: torch.Tensor, ep_size: int):  # noqa: ANN202
    """SGLang's ExpertLocationMetadata of a physical-to-logical map [layers, P] (every replica listed)."""
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    layers, slots = p2l.shape
    num_experts = int(p2l.max()) + 1
    table = torch.full((layers, num_experts, slots), -1, dtype=torch.int64)
    for layer in range(layers):
        for slot, expert in enumerate(p2l[layer].tolist()):
            row = table[layer, expert]
            row[int((row >= 0).sum())] = slot
    return ExpertLocationMetadata(physical_to_logical_map=p2l.clone(), physical_to_logical_map_cpu=p2l.clone(),
                                  logical_to_all_physical_map=table, logical_to_all_physical_map_cpu=table.clone(),
                                  logical_to_all_physical_map_num_valid=(table >= 0).sum(-1), ep_size=ep_size,
                                  logical_to_rank_dispatch_physical_map=None)


class _CopyLog(TorchDispatchMode):
    """(destination tensor, source values) of every ``copy_``."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.ops.aten.copy_.default:
            self.copies.append((args[0], args[1].clone()))
        return func(*args, **(kwargs or {}))


_PLACEMENT_TENSORS = ("slot_gpu", "slot_expert", "replicas", "replica_gpu", "primary_gpu")


def test_placement_device_copies_are_kept_and_rewritten_in_place_when_eplb_rebalances(monkeypatch):
    from sglang.srt.eplb import expert_location

    from xshare.sglang.hooks import model as model_hooks
    from xshare.sglang.placement import sglang_placement

    e, ep, layer = 16, 4, 1
    before = torch.stack([torch.cat([torch.arange(e), torch.tensor([0, 5, 10, 15])]) for _ in range(2)])
    live = _expert_location(before, ep)
    monkeypatch.setattr(expert_location.get_resources(), "expert_location_metadata", live)  # restored afterwards
    assert expert_location.get_global_expert_location_metadata() is live
    runtime = rt.install(PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare_ep", budget=8)))
    try:
        runtime.placements.source = functools.partial(sglang_placement, runtime.placements)
        device = torch.device(DEVICE)
        held = runtime.placements.for_layer(layer, e, device)
        tensors = [getattr(held, n) for n in _PLACEMENT_TENSORS]
        assert all(t.device == device for t in tensors)
        with forbid_host_transfers() as transfers:  # later calls: the kept copy, nothing copied
            again = [runtime.placements.for_layer(layer, e, device) for _ in range(3)]
        assert transfers == [] and all(p is held for p in again)

        # EPLB: expert 0 now has three replicas (the replica table grows), expert 5 none beyond its own
        after = before.clone()
        after[layer, 17] = 0
        live.update(_expert_location(after, ep), update_layer_ids=[layer])  # SGLang's own in-place update
        expected = Placement.from_physical(after[layer], ep)
        assert expected.replicas.shape[1] == 3 and held.replicas.shape[1] >= 3  # fixed width: no reallocation
        with _CopyLog() as log:
            model_hooks.expert_location_update_hook(None, live, None, update_layer_ids=[layer])
        written = {id(dst): src for dst, src in log.copies}
        for name, tensor in zip(_PLACEMENT_TENSORS, tensors, strict=True):
            assert id(tensor) in written, f"{name} was not rewritten in place"
            want = getattr(expected.padded(tensor.shape[-1]) if tensor.ndim == 2 else expected, name)
            assert torch.equal(written[id(tensor)], want), name
        with forbid_host_transfers() as transfers:  # refreshed: the next call copies nothing
            now = runtime.placements.for_layer(layer, e, device)
        assert transfers == [] and now is held
        assert all(getattr(now, n) is t for n, t in zip(_PLACEMENT_TENSORS, tensors, strict=True))
        assert runtime.placements.refresh() == 0  # nothing changed since
    finally:
        rt.uninstall()


def test_a_changed_placement_found_by_a_lookup_is_rewritten_in_place_too():
    """Without the EPLB hook (the stand-in placements), a lookup that finds a new host placement writes
    it into the kept device tensors as well."""
    from xshare.sglang.placement import PlacementCache

    gpus = [2]
    cache = PlacementCache(lambda: gpus[0])
    device = torch.device(DEVICE)
    held = cache.for_layer(0, 16, device)
    assert held.num_gpus == 2
    assert cache.for_layer(0, 16, device) is held
    with _CopyLog() as log:
        assert cache.refresh([1]) == 0  # another layer: nothing read again
    assert log.copies == []
    cache.source = lambda layer_id, num_experts: Placement.from_physical(torch.arange(16).flip(0), 2)
    with _CopyLog() as log:
        now = cache.for_layer(0, 16, device)
    assert now is held and {id(dst) for dst, _ in log.copies} == {id(getattr(held, n)) for n in _PLACEMENT_TENSORS}
    assert torch.equal(dict((id(d), s) for d, s in log.copies)[id(held.slot_expert)], torch.arange(16).flip(0))


@pytest.mark.parametrize("policy", ["xshare_ep", "xshare"])  # replicas: least-loaded / spread over them
def test_a_padded_replica_table_routes_as_the_placement_itself(policy):
    from xshare.selection import select

    p2l = torch.cat([torch.arange(16), torch.tensor([0, 0, 9, 13])])  # expert 0 has three replicas
    placement = Placement.from_physical(p2l, 4)
    padded = placement.padded(placement.num_slots - placement.num_experts + 1)
    assert padded.replicas.shape == (16, 5) and torch.equal(padded.replicas[:, :3], placement.replicas)
    assert bool((padded.replica_gpu[:, 3:] == -1).all())
    logits = torch.randn(24, 16, generator=torch.Generator().manual_seed(5))
    config = SelectorConfig(policy=policy, budget=6, warmup_k=1)
    want = select(logits, 4, config, placement=placement)
    got = select(logits, 4, config, placement=padded)
    assert want.physical_ids is not None and torch.equal(got.physical_ids, want.physical_ids)
    assert torch.equal(got.topk_ids, want.topk_ids)
    assert bool((p2l[want.physical_ids.long()] == want.topk_ids).all())  # each slot holds its expert
    with pytest.raises(ValueError, match="width"):
        placement.padded(2)
