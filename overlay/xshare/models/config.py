"""The trained tiny model's configuration: :class:`TinyConfig` (shape and training recipe, the model's
identity) and the model it describes (:func:`build_model`, through the one builder of
:mod:`xshare.models.architecture`).

The same :class:`TinyConfig` on the same torch build, CPU instruction set and thread count gives the
same weights bit for bit (the manifest's ``weights_sha256``, :mod:`xshare.models.store`).
:meth:`TinyConfig.identity` names the model's cache directory (``tiny-moe-<identity>``,
:func:`xshare.models.cache.default_model_dir`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from xshare.models import tasks as T
from xshare.models.architecture import build_moe, build_qwen3_moe, glm4_moe_config, qwen3_moe_config

FORMAT_VERSION = 2  # 2: padding rows skip the experts in training; fused AdamW


@dataclass(frozen=True)
class TinyConfig:
    """Model shape and training recipe. Every field takes part in the model's identity (hash)."""

    #: The Hugging Face model_type (not a field: the Qwen3-MoE model's identity is unchanged).
    arch: ClassVar[str] = "qwen3_moe"
    #: The cache directory's prefix (``<cache>/<prefix>-<identity>``).
    cache_prefix: ClassVar[str] = "tiny-moe"

    # model (Qwen3-MoE)
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    num_experts: int = 32
    top_k: int = 4
    moe_intermediate_size: int = 512
    max_position_embeddings: int = 64
    router_aux_loss_coef: float = 0.01
    # training
    seed: int = 0
    steps: int = 1600
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    threads: int = 2
    tasks: tuple[str, ...] = T.TASKS
    task_weights: tuple[tuple[str, int], ...] = (("add", 2),)  # problems per round-robin cycle (default 1)

    def __post_init__(self) -> None:
        ints = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "num_experts", "top_k",
                "moe_intermediate_size", "max_position_embeddings", "steps", "batch_size", "threads")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TinyConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("warmup_steps", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TinyConfig.{name} must be an int >= 0, got {v!r}")
        for name in ("router_aux_loss_coef", "lr", "min_lr_ratio", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"TinyConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"TinyConfig.lr must be > 0, got {self.lr!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"TinyConfig.top_k = {self.top_k} exceeds num_experts = {self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TinyConfig.num_heads = {self.num_heads} must be a multiple of "
                             f"num_kv_heads = {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"TinyConfig.head_dim must be even (rotary embedding), got {self.head_dim}")
        longest = T.MAX_PROMPT_CHARS + T.MAX_ANSWER_CHARS + 1
        if self.max_position_embeddings < longest:
            raise ValueError(f"TinyConfig.max_position_embeddings must be >= {longest} (longest problem), "
                             f"got {self.max_position_embeddings}")
        object.__setattr__(self, "tasks", T._check_tasks(tuple(self.tasks)))
        try:
            given = dict(self.task_weights)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"TinyConfig.task_weights must be (task, int) pairs, got {self.task_weights!r}") from exc
        unknown = sorted(str(t) for t in given if t not in T.TASKS)
        if unknown:
            raise ValueError(f"TinyConfig.task_weights: unknown task(s) {unknown}; known tasks: {list(T.TASKS)}")
        # weights of known tasks that are not trained (tasks=...) are dropped; canonical order
        weights = tuple(sorted((t, w) for t, w in given.items() if t in self.tasks))
        object.__setattr__(self, "task_weights", weights)
        next(T.training_problems(self.seed, self.tasks, dict(weights)))  # validates the weights

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        d["task_weights"] = dict(self.task_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TinyConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a TinyConfig must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        d = dict(d)
        if cls.arch != TinyConfig.arch and d.pop("arch", cls.arch) != cls.arch:
            raise ValueError(f"not a {cls.__name__} config (arch {cls.arch!r} expected)")
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TinyConfig key(s) {unknown}; known: {sorted(known)}")
        kw = dict(d)
        if "tasks" in kw:
            kw["tasks"] = tuple(kw["tasks"])
        if isinstance(kw.get("task_weights"), dict):
            kw["task_weights"] = tuple(kw["task_weights"].items())
        return cls(**kw)

    def replace(self, **kw: Any) -> TinyConfig:
        return type(self).from_dict({**self.to_dict(), **kw})

    def identity(self) -> str:
        """A short hash of the config and the recipe version (names cache directories)."""
        blob = json.dumps({"format": FORMAT_VERSION, **self.to_dict()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class AuxFreeConfig(TinyConfig):
    """The second trained tiny model: DeepSeek-V3's aux-loss-free router on the GLM-4.5 architecture
    (``Glm4MoeForCausalLM``, which SGLang's CPU path serves; DeepSeek-V3's own MLA attention it cannot:
    docs/model.md), trained on the same tasks.

    Router: sigmoid affinities; per token the ``topk_group`` of the ``n_group`` expert groups with the
    highest sum of their two best biased affinities (affinity + ``e_score_correction_bias``) are kept and
    the ``top_k`` best biased affinities among their experts routed; the weights are the unbiased
    affinities of those experts, renormalised, times ``routed_scaling_factor``; ``n_shared_experts``
    shared experts on every token; the first ``first_k_dense_replace`` layers dense. No auxiliary loss
    (``router_aux_loss_coef`` must be 0): after every optimiser step each MoE layer's bias moves by
    ``bias_update_speed`` towards balance, ``bias_e += speed * sign(mean load - load_e)`` over the
    step's real (non-padding) tokens (:func:`xshare.models.training.update_correction_bias`)."""

    arch: ClassVar[str] = "glm4_moe"
    cache_prefix: ClassVar[str] = "tiny-auxfree"
    #: The recipe version of this model (its own: the Qwen3-MoE model's FORMAT_VERSION stays as it is).
    format_version: ClassVar[int] = 1
    #: The selector setting shipped for this model (``xshare`` policy; docs/model.md): experts per layer and the
    #: warm-up k0 (each token keeps its own top-2: this router's renormalised weights are flat, so an expert
    #: swapped in for one of a token's two best costs accuracy; with k0 = 1 exact match falls by 3-4 points).
    serving_budget: ClassVar[int] = 8
    serving_warmup_k: ClassVar[int] = 2

    moe_intermediate_size: int = 256
    router_aux_loss_coef: float = 0.0
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    n_shared_experts: int = 1
    first_k_dense_replace: int = 0
    bias_update_speed: float = 1e-3
    steps: int = 1200

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.router_aux_loss_coef != 0:
            raise ValueError(f"AuxFreeConfig.router_aux_loss_coef must be 0 (the router is balanced by its "
                             f"correction bias, without an auxiliary loss), got {self.router_aux_loss_coef!r}")
        for name in ("n_group", "topk_group", "n_shared_experts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"AuxFreeConfig.{name} must be an int >= 1, got {v!r}")
        if self.num_experts % self.n_group or self.num_experts // self.n_group < 2:
            raise ValueError(f"AuxFreeConfig.num_experts = {self.num_experts} must split into n_group = "
                             f"{self.n_group} groups of >= 2 experts (a group scores its two best)")
        if self.topk_group > self.n_group:
            raise ValueError(f"AuxFreeConfig.topk_group = {self.topk_group} exceeds n_group = {self.n_group}")
        if self.topk_group * (self.num_experts // self.n_group) < self.top_k:
            raise ValueError(f"AuxFreeConfig.top_k = {self.top_k} exceeds the experts of topk_group = "
                             f"{self.topk_group} groups")
        v = self.first_k_dense_replace
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.num_layers:
            raise ValueError(f"AuxFreeConfig.first_k_dense_replace must be an int in [0, num_layers), got {v!r}")
        for name in ("routed_scaling_factor", "bias_update_speed"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"AuxFreeConfig.{name} must be a finite number >= 0, got {v!r}")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"AuxFreeConfig.routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **super().to_dict()}

    def identity(self) -> str:
        blob = json.dumps({"format": self.format_version, **self.to_dict()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(range(self.first_k_dense_replace, self.num_layers))


#: The trained tiny models by router (``xshare train-tiny --router NAME``).
ROUTERS: dict[str, type[TinyConfig]] = {"softmax": TinyConfig, "deepseek_v3": AuxFreeConfig}


def config_from_dict(d: dict[str, Any]) -> TinyConfig:
    """A manifest's config, of the class its ``arch`` names (none: the Qwen3-MoE :class:`TinyConfig`)."""
    if isinstance(d, dict) and d.get("arch", TinyConfig.arch) == AuxFreeConfig.arch:
        return AuxFreeConfig.from_dict(d)
    return TinyConfig.from_dict(d)


def model_config(cfg: TinyConfig):  # noqa: ANN201 (transformers.Qwen3MoeConfig or Glm4MoeConfig)
    """The Hugging Face config of ``cfg``'s model (the character tokenizer's vocabulary and special ids)."""
    ids = {name: i for i, name in enumerate(T.SPECIALS)}
    shape = dict(
        vocab_size=len(T.SPECIALS) + len(T.ALPHABET),
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,  # the dense layers' (Qwen3-MoE: unused, every layer is sparse)
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        bos_token_id=ids[T.BOS],
        eos_token_id=ids[T.EOS],
        pad_token_id=ids[T.PAD],
    )
    if isinstance(cfg, AuxFreeConfig):
        return glm4_moe_config(**shape, n_group=cfg.n_group, topk_group=cfg.topk_group,
                               routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=True,
                               n_shared_experts=cfg.n_shared_experts, first_k_dense_replace=cfg.first_k_dense_replace)
    return qwen3_moe_config(**shape, router_aux_loss_coef=cfg.router_aux_loss_coef)


def build_model(cfg: TinyConfig):  # noqa: ANN201 (transformers.Qwen3MoeForCausalLM or Glm4MoeForCausalLM)
    """A freshly initialised model (float32, the library's initialisers; the correction bias starts at 0),
    deterministic in ``cfg.seed``."""
    if isinstance(cfg, AuxFreeConfig):
        return build_moe(model_config(cfg), seed=cfg.seed)
    return build_qwen3_moe(model_config(cfg), seed=cfg.seed)
