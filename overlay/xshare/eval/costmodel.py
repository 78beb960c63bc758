"""A roofline model of MoE decode time on GPUs we do not have (H100, H200).

Per MoE layer and batch, from the replayed routing (activated experts and token assignments per
GPU, tokens sent to other GPUs):

    t_gpu(g)   = max(bytes(g) / (HBM bandwidth * hbm_efficiency), flops(g) / (peak * flops_efficiency))
    bytes(g)   = activated routed experts on g * params per expert * bytes per param
                 + shared experts (every GPU runs its own tokens through them)
    flops(g)   = 2 * params per expert * token-expert assignments on g + 2 * shared params * tokens on g
    t_a2a      = 2 * (a2a_latency + max_g max(sent(g), received(g)) * hidden * 2 B / link bandwidth)
                 (dispatch + combine in bf16; 0 with one GPU; NVLink within a node of 8, else InfiniBand)
    t_layer    = max_g t_gpu(g) + t_a2a + selector overhead (not for 'topk')

Tokens are spread over the GPUs as under DP attention: the batch's i-th token starts on GPU i mod G,
and is sent once to every other GPU that holds one of its experts. A decode step is every MoE layer
of the model (the replayed layers' mean, times the model's MoE-layer count) plus the non-MoE weights
(attention, dense layers, embeddings), which every GPU reads once per step at HBM speed:

    t_step     = non-MoE bytes / (HBM bandwidth * hbm_efficiency) + sum over MoE layers of t_layer
    OTPS ratio = t_step(topk) / t_step(policy)          (same batch, OTPS = B / t_step)

Not modelled (stated with every result): KV-cache reads and attention FLOPs (they add the same
time to every policy, so leaving them out overstates the OTPS ratio), kernel launch gaps, overlap of
communication with compute, grouped-GEMM tile waste at small token counts, DeepSeek-V3's grouped
routing and bias correction, and the accuracy effect of a policy.

Calibration (``CALIBRATION``, docs/costmodel.md): two more terms, off by default so that ``xshare
eval`` keeps the plain roofline above: ``moe_fixed_us``, a fixed cost per fused-MoE call (launches,
alignment, activation, reduction), and ``expert_hbm_efficiency``, the share of HBM bandwidth the
fused-MoE kernel reaches while streaming expert weights. Both are fitted to SGLang's published H200
kernel times (PR 11730, untuned fused MoE Triton kernel, Qwen3-235B-A22B FP8, TP 8):
``t_layer = moe_fixed_us + max_g(max(bytes(g) / (HBM * expert_hbm_efficiency), FLOPs(g) / peak))``.
``tp`` slices every expert over ``tp`` GPUs (bytes and FLOPs per GPU divided by ``tp``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GPUSpec:
    name: str
    hbm_bandwidth: float  # bytes/s
    bf16_flops: float  # dense, FLOP/s
    fp8_flops: float
    nvlink_bandwidth: float  # bytes/s per direction per GPU
    network_bandwidth: float  # bytes/s per direction per GPU across nodes
    memory_gb: float
    source: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_experts: int
    top_k: int
    hidden: int
    moe_intermediate: int
    moe_layers: int
    shared_experts: int  # always-on experts per MoE layer, each of moe_intermediate width
    total_params: float  # as published
    active_params: float  # as published
    expert_bytes_per_param: float
    dense_bytes_per_param: float
    compute: str  # 'bf16' | 'fp8'
    source: str
    # KV cache read per decode step (0 = not modelled): bytes per cached token over the layers that attend
    # the whole context, and per request over the sliding-window layers (a constant window)
    kv_bytes_per_token: float = 0.0
    window_kv_bytes: float = 0.0

    @property
    def params_per_expert(self) -> int:
        """gate + up + down projections."""
        return 3 * self.hidden * self.moe_intermediate

    @property
    def routed_params(self) -> float:
        return float(self.num_experts * self.moe_layers * self.params_per_expert)

    @property
    def shared_params(self) -> float:
        return float(self.shared_experts * self.moe_layers * self.params_per_expert)

    @property
    def non_moe_params(self) -> float:
        """Published total minus routed and shared experts: attention, dense layers, embeddings, norms."""
        return max(0.0, self.total_params - self.routed_params - self.shared_params)


GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec("H100 SXM5 80GB", hbm_bandwidth=3.35e12, bf16_flops=989e12, fp8_flops=1979e12,
                    nvlink_bandwidth=450e9, network_bandwidth=50e9, memory_gb=80,
                    source="NVIDIA H100 datasheet: 3.35 TB/s HBM3, 989 TFLOPS BF16 / 1979 FP8 dense, NVLink 900 GB/s "
                           "(450 per direction), ConnectX-7 400 Gb/s per GPU"),
    "h200": GPUSpec("H200 SXM 141GB", hbm_bandwidth=4.8e12, bf16_flops=989e12, fp8_flops=1979e12,
                    nvlink_bandwidth=450e9, network_bandwidth=50e9, memory_gb=141,
                    source="NVIDIA H200 datasheet: 4.8 TB/s HBM3e, same compute and NVLink as H100"),
}

MODELS: dict[str, ModelSpec] = {
    "deepseek-v2-lite": ModelSpec(
        "DeepSeek-V2-Lite", num_experts=64, top_k=6, hidden=2048, moe_intermediate=1408, moe_layers=26,
        shared_experts=2, total_params=15.7e9, active_params=2.4e9, expert_bytes_per_param=2.0,
        dense_bytes_per_param=2.0, compute="bf16",
        source="config.json: hidden 2048, moe_intermediate_size 1408, 27 layers (first dense), 64 routed + 2 shared, "
               "top-6; 15.7B total / 2.4B active; BF16",
        kv_bytes_per_token=27 * (512 + 64) * 2.0),
    "deepseek-v3": ModelSpec(
        "DeepSeek-V3", num_experts=256, top_k=8, hidden=7168, moe_intermediate=2048, moe_layers=58,
        shared_experts=1, total_params=671e9, active_params=37e9, expert_bytes_per_param=1.0,
        dense_bytes_per_param=1.0, compute="fp8",
        source="config.json: hidden 7168, moe_intermediate_size 2048, 61 layers (first 3 dense), 256 routed + 1 "
               "shared, top-8; 671B total / 37B active (without MTP); FP8 weights",
        kv_bytes_per_token=61 * (512 + 64) * 2.0),
    "qwen3-30b-a3b": ModelSpec(
        "Qwen3-30B-A3B", num_experts=128, top_k=8, hidden=2048, moe_intermediate=768, moe_layers=48,
        shared_experts=0, total_params=30.5e9, active_params=3.3e9, expert_bytes_per_param=2.0,
        dense_bytes_per_param=2.0, compute="bf16",
        source="config.json: hidden 2048, moe_intermediate_size 768, 48 MoE layers, 128 experts, top-8; "
               "30.5B total / 3.3B active; BF16",
        kv_bytes_per_token=48 * 4 * 128 * 2 * 2.0),
    "qwen3-235b-a22b": ModelSpec(
        "Qwen3-235B-A22B", num_experts=128, top_k=8, hidden=4096, moe_intermediate=1536, moe_layers=94,
        shared_experts=0, total_params=235e9, active_params=22e9, expert_bytes_per_param=1.0 + 4 / 128**2,
        dense_bytes_per_param=1.0 + 4 / 128**2, compute="fp8",
        source="config.json: hidden 4096, moe_intermediate_size 1536, 94 MoE layers, 128 experts, top-8; 235B total "
               "/ 22B active; FP8 release (Qwen3-235B-A22B-FP8: e4m3 weights, one float32 scale per 128x128 block)",
        kv_bytes_per_token=94 * 4 * 128 * 2 * 2.0),
    "gpt-oss-120b": ModelSpec(
        "GPT-OSS-120B", num_experts=128, top_k=4, hidden=2880, moe_intermediate=2880, moe_layers=36,
        shared_experts=0, total_params=116.8e9, active_params=5.1e9, expert_bytes_per_param=4.25 / 8,
        dense_bytes_per_param=2.0, compute="bf16",
        source="config.json: hidden 2880, intermediate_size 2880, 36 MoE layers, 128 experts, top-4; 116.8B total / "
               "5.1B active; MXFP4 experts (4.25 bits/param incl. scales), BF16 rest, BF16 compute on Hopper; "
               "attention alternates full-context and 128-token sliding-window layers, 8 KV heads x 64",
        kv_bytes_per_token=18 * 8 * 64 * 2 * 2.0, window_kv_bytes=18 * 128 * 8 * 64 * 2 * 2.0),
}


def match_model(num_experts: int, top_k: int) -> str | None:
    """The preset whose expert count and top-k equal the trace's (first in table order), or None."""
    for key, m in MODELS.items():
        if m.num_experts == num_experts and m.top_k == top_k:
            return key
    return None


@dataclass(frozen=True)
class CostModel:
    gpu: GPUSpec
    model: ModelSpec
    num_gpus: int
    hbm_efficiency: float = 0.8
    flops_efficiency: float = 0.6
    a2a_latency_us: float = 10.0
    selector_us: float = 10.0
    gpus_per_node: int = 8
    act_bytes: float = 2.0
    tp: int = 1  # every expert sliced over this many GPUs (tensor parallel): bytes and FLOPs per GPU / tp
    moe_fixed_us: float = 0.0  # fixed cost of one fused-MoE call (calibration; 0 = the plain roofline)
    expert_hbm_efficiency: float | None = None  # HBM share while streaming expert weights (None = hbm_efficiency)

    def __post_init__(self) -> None:
        for name in ("hbm_efficiency", "flops_efficiency"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
        if self.expert_hbm_efficiency is not None and not 0 < self.expert_hbm_efficiency <= 1:
            raise ValueError(f"--expert-hbm-efficiency must be in (0, 1], got {self.expert_hbm_efficiency}")
        for name in ("a2a_latency_us", "selector_us", "moe_fixed_us"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if self.num_gpus < 1:
            raise ValueError("--gpus must be >= 1")
        if self.tp < 1:
            raise ValueError("--tp must be >= 1")

    @property
    def peak_flops(self) -> float:
        return (self.gpu.fp8_flops if self.model.compute == "fp8" else self.gpu.bf16_flops) * self.flops_efficiency

    @property
    def bandwidth(self) -> float:
        return self.gpu.hbm_bandwidth * self.hbm_efficiency

    @property
    def expert_bandwidth(self) -> float:
        """Bytes/s at which the fused-MoE kernel streams expert weights."""
        eff = self.hbm_efficiency if self.expert_hbm_efficiency is None else self.expert_hbm_efficiency
        return self.gpu.hbm_bandwidth * eff

    @property
    def link_bandwidth(self) -> float:
        return self.gpu.nvlink_bandwidth if self.num_gpus <= self.gpus_per_node else self.gpu.network_bandwidth

    @property
    def expert_bytes(self) -> float:
        """Bytes of one routed expert held by one GPU (its 1/tp slice)."""
        return self.model.params_per_expert * self.model.expert_bytes_per_param / self.tp

    def layer_times(self, gpu_active: np.ndarray, gpu_assign: np.ndarray, sent: np.ndarray, received: np.ndarray,
                    tokens: np.ndarray) -> np.ndarray:
        """Seconds per MoE layer (selector overhead excluded) for N batches.

        gpu_active, gpu_assign, sent, received: [N, G] (activated experts, token-expert assignments,
        tokens sent to / received from other GPUs); tokens: [N] tokens in each batch.
        """
        m = self.model
        pe = m.params_per_expert / self.tp
        g = self.num_gpus
        tokens_here = np.asarray(tokens, dtype=np.float64)[:, None] / g  # DP attention: tokens per GPU
        bytes_ = (np.asarray(gpu_active, dtype=np.float64) + m.shared_experts) * pe * m.expert_bytes_per_param
        flops = 2.0 * pe * gpu_assign + 2.0 * m.shared_experts * pe * tokens_here
        t_gpu = np.maximum(bytes_ / self.expert_bandwidth, flops / self.peak_flops)
        t = t_gpu.max(-1) + self.moe_fixed_us * 1e-6
        if g > 1:
            volume = np.maximum(sent, received).max(-1) * m.hidden * self.act_bytes
            t = t + 2.0 * (self.a2a_latency_us * 1e-6 + volume / self.link_bandwidth)
        return t

    def kv_seconds(self, batch: int, context: float) -> float:
        """KV-cache read of one decode step: ``batch`` requests with ``context`` cached tokens each
        (sliding-window layers read their window); 0 when the preset has no KV figures."""
        if batch < 0 or context < 0:
            raise ValueError("--context must be >= 0")
        m = self.model
        window = m.window_kv_bytes if context > 0 else 0.0
        return batch * (context * m.kv_bytes_per_token + window) / self.tp / self.bandwidth

    def non_moe_seconds(self) -> float:
        return self.model.non_moe_params * self.model.dense_bytes_per_param / self.tp / self.bandwidth

    def step_seconds(self, moe_layer_sum: np.ndarray, num_layers_replayed: int, selector: bool) -> np.ndarray:
        """Per batch: non-MoE time + the model's MoE layers (replayed layers' mean times moe_layers)."""
        per_layer = np.asarray(moe_layer_sum) / num_layers_replayed
        if selector:
            per_layer = per_layer + self.selector_us * 1e-6
        return self.non_moe_seconds() + per_layer * self.model.moe_layers

    def describe(self) -> dict[str, Any]:
        m = self.model
        return {
            "gpu": asdict(self.gpu),
            "model": {**asdict(m), "params_per_expert": m.params_per_expert, "routed_params": m.routed_params,
                      "shared_params": m.shared_params, "non_moe_params": m.non_moe_params},
            "num_gpus": self.num_gpus,
            "hbm_efficiency": self.hbm_efficiency,
            "flops_efficiency": self.flops_efficiency,
            "a2a_latency_us": self.a2a_latency_us,
            "selector_us": self.selector_us,
            "tp": self.tp,
            "moe_fixed_us": self.moe_fixed_us,
            "expert_hbm_efficiency": self.expert_hbm_efficiency,
            "gpus_per_node": self.gpus_per_node,
            "activation_bytes": self.act_bytes,
            "link": "NVLink" if self.num_gpus <= self.gpus_per_node else "network",
            "not_modelled": ["KV-cache reads and attention FLOPs (same for every policy: the OTPS ratio is an upper "
                             "bound)", "kernel launch gaps and communication/compute overlap",
                             "grouped-GEMM tile waste at small token counts", "grouped routing / bias correction",
                             "accuracy"],
        }

    def assumptions(self) -> list[str]:
        """Human-readable lines printed with every cost-model result."""
        m, gp = self.model, self.gpu
        link = "NVLink" if self.num_gpus <= self.gpus_per_node else "inter-node network"
        return [
            f"GPU {gp.name}: HBM {gp.hbm_bandwidth / 1e12:.2f} TB/s x {self.hbm_efficiency:.2f} efficiency, "
            f"{(gp.fp8_flops if m.compute == 'fp8' else gp.bf16_flops) / 1e12:.0f} TFLOPS {m.compute.upper()} "
            f"x {self.flops_efficiency:.2f}; {link} {self.link_bandwidth / 1e9:.0f} GB/s per direction ({gp.source})",
            f"model {m.name}: {m.num_experts} routed experts (top-{m.top_k}) + {m.shared_experts} shared, "
            f"{m.moe_layers} MoE layers, hidden {m.hidden}, expert width {m.moe_intermediate}; "
            f"{m.params_per_expert / 1e6:.2f}M params/expert at {m.expert_bytes_per_param:g} B/param; "
            f"published {m.total_params / 1e9:.1f}B total / {m.active_params / 1e9:.1f}B active = "
            f"{m.routed_params / 1e9:.1f}B routed + {m.shared_params / 1e9:.2f}B shared + "
            f"{m.non_moe_params / 1e9:.2f}B other ({m.source})",
            f"{self.num_gpus} GPU(s), expert parallel; tokens start on GPU (index mod G) as under DP attention; "
            f"all-to-all = 2 x ({self.a2a_latency_us:g} us + max per-GPU volume x hidden x {self.act_bytes:g} B "
            "/ link)",
            f"per MoE layer: {self.moe_fixed_us:g} us fixed + max over GPUs of max(expert bytes / "
            f"(HBM x {self.expert_bandwidth / self.gpu.hbm_bandwidth:.3g}), FLOPs / peak) + all-to-all + "
            f"{self.selector_us:g} us selector (not for topk); experts sliced over tp = {self.tp}; every GPU reads the "
            f"{m.non_moe_params / 1e9:.2f}B non-MoE params once per step",
            "not modelled: KV-cache reads, attention FLOPs (equal for all policies, so OTPS ratios are upper bounds), "
            "launch gaps, comm/compute overlap, GEMM tile waste, accuracy",
        ]


# -- calibration on published H200 measurements ----------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """Published fused-MoE kernel times of one MoE layer (vanilla routing) per batch size."""

    source: str
    model: str  # a MODELS key
    gpu: str  # a GPUS key
    tp: int
    routing: str  # how the benchmark routed: 'uniform' = random gate logits
    batch: tuple[int, ...]
    kernel_us: tuple[float, ...]


# SGLang PR 11730 ("add tuned fuse moe kernel for qwen3 235b fp8 on h200"), section "Without tuned kernel":
# benchmark/kernels/fused_moe_triton/tuning_fused_moe_triton.py --model Qwen/Qwen3-235B-A22B-Instruct-2507
# --tp-size 8 --dtype fp8_w8a8, default config BLOCK_SIZE_M 64 / N 128 / K 128, num_warps 4, num_stages 4.
# That script routes random normal gate logits through the model's top-k: uniform routing.
SGLANG_PR11730 = Measurement(
    source="SGLang PR 11730, untuned fused MoE Triton kernel (default config), Qwen3-235B-A22B-Instruct-2507 "
           "fp8_w8a8, TP 8, one H200, CUDA-graph replay",
    model="qwen3-235b-a22b", gpu="h200", tp=8, routing="uniform",
    batch=(1, 2, 4, 8, 16, 24, 32), kernel_us=(31.70, 36.56, 49.67, 66.87, 92.36, 117.38, 124.99),
)

# Fitted to SGLANG_PR11730 by fit_calibration() (least squares on the relative error; the test
# tests/bench/test_bench_costmodel.py re-fits and checks these rounded values): per fused-MoE call a fixed
# 23.8 us, and expert weights streamed at 0.561 x 4.8 TB/s = 2.69 TB/s.
CALIBRATION: dict[str, float] = {"moe_fixed_us": 23.8, "expert_hbm_efficiency": 0.561}


def uniform_active(num_experts: int, top_k: int, batch: int | np.ndarray) -> np.ndarray:
    """Expected distinct experts of a batch under uniform routing (each token a uniformly random
    top_k-subset, independently): E * (1 - (1 - k/E)^B)."""
    b = np.asarray(batch, dtype=np.float64)
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** b)


def fit_calibration(meas: Measurement = SGLANG_PR11730, *, use: slice = slice(None)) -> dict[str, float]:
    """Fit ``moe_fixed_us`` and ``expert_hbm_efficiency`` to ``meas`` (the points ``use`` selects):
    t = fixed + N(B) * expert bytes / (HBM * eff), N(B) the uniform expected distinct experts,
    by least squares on the relative error. Memory-bound by construction: at these batches the
    FLOPs term is < 2% of the time (checked by the caller's tests)."""
    m = MODELS[meas.model]
    base = CostModel(GPUS[meas.gpu], m, 1, tp=meas.tp)
    n = uniform_active(m.num_experts, m.top_k, np.asarray(meas.batch[use]))
    t = np.asarray(meas.kernel_us[use], dtype=np.float64)
    a = np.stack([np.ones_like(n), n], 1) / t[:, None]
    (fixed, per_expert), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    eff = base.expert_bytes / (per_expert * 1e-6) / GPUS[meas.gpu].hbm_bandwidth
    return {"moe_fixed_us": float(fixed), "expert_hbm_efficiency": float(eff), "us_per_expert": float(per_expert)}
