"""Tiny, deterministic MoE models in Hugging Face format, with their own tokenizer.

Nothing is downloaded: the byte-level BPE tokenizer is trained on a synthetic, seeded corpus of
Python-like text generated here, and the weights are drawn from a seeded generator (no
dependence on the library's own initialisers: :class:`xshare.models.architecture.ScaledInit`).
The models are built by the same builder as the trained tiny model
(:func:`xshare.models.architecture.build_moe`), each in its own shape:

* :class:`TinyMoeSpec` (the default): Qwen3-MoE, softmax top-k renormalised;
* :class:`TinyGlm4MoeSpec`: the GLM-4.5 architecture (``Glm4MoeForCausalLM``): sigmoid router with a
  random, non-zero ``e_score_correction_bias``, expert groups, one shared expert, a routed scaling
  factor, the first layer dense;
* :class:`TinyMixtralSpec`: Mixtral, softmax top-2.

:data:`PRESETS` names the shapes the tests serve (``xshare tiny-model --arch NAME``), among them
``deepseek_v3_router``: DeepSeek-V3's grouped router (8 groups, 4 kept) on the GLM-4.5 architecture,
since SGLang's CPU path cannot run DeepSeek's MLA attention (docs/model.md).
The same arguments give the same files, byte for byte, on the same library versions;
``manifest.json`` records the arguments (and, except for Qwen3-MoE, the architecture) and file hashes.

The defaults make routing matter: 16 experts, top-4, router logits of unit scale (decisive
top-k), and expert outputs large enough that a different expert choice can change the greedy
tokens. Random weights: the text is gibberish, which is fine for serving tests.

Requires ``transformers`` and ``tokenizers`` (installed with the SGLang CPU stack).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from xshare.models.architecture import DTYPES, ScaledInit, build_moe, glm4_moe_config, mixtral_config, qwen3_moe_config

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MANIFEST = "manifest.json"

_WORDS = (
    "self data value result items index count name path text line key config model layer token batch "
    "expert router score budget weight cache state request server client buffer tensor shape size "
    "total first last start stop open close read write send load save build parse check update"
).split()
_KEYWORDS = ("def", "return", "if", "elif", "else", "for", "while", "in", "not", "and", "or", "import",
             "from", "class", "with", "as", "try", "except", "raise", "None", "True", "False", "lambda")


@dataclass(frozen=True)
class TinyMoeSpec:
    """Shape and seed of the tiny model (Qwen3-MoE architecture; the base of the other architectures' specs)."""

    arch: ClassVar[str] = "qwen3_moe"  # the Hugging Face model_type (not a field: the manifest's spec is unchanged)
    num_experts: int = 16
    top_k: int = 4
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    vocab_size: int = 1024
    max_position_embeddings: int = 2048
    router_scale: float = 1.0  # router logits ~ N(0, router_scale^2) for unit-norm inputs
    expert_scale: float = 4.0  # expert output gain relative to a standard init
    seed: int = 0
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "moe_intermediate_size", "vocab_size", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k = {self.top_k} exceeds num_experts = {self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads = {self.num_heads} must be a multiple of num_kv_heads = {self.num_kv_heads}")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 bytes + merges + specials), got {self.vocab_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The ids of the MoE layers (every layer)."""
        return tuple(range(self.num_layers))


@dataclass(frozen=True)
class TinyGlm4MoeSpec(TinyMoeSpec):
    """Shape and seed of a tiny GLM-4.5-architecture model (``Glm4MoeForCausalLM``).

    The first ``first_k_dense_replace`` layers are dense (SwiGLU of ``intermediate_size``), the others
    MoE: a sigmoid router over ``num_experts`` experts in ``n_group`` groups; per token the ``topk_group``
    groups with the highest sum of their two best biased scores are kept and the ``top_k`` best biased
    scores (sigmoid + ``e_score_correction_bias``) among them routed, with the unbiased sigmoid scores
    as weights, renormalised if ``norm_topk_prob``, times ``routed_scaling_factor``; plus
    ``n_shared_experts`` shared experts on every token. The correction bias is N(0, ``bias_scale``^2),
    drawn after the weights from the same generator, stored in float32."""

    arch: ClassVar[str] = "glm4_moe"
    num_layers: int = 3
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    bias_scale: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_group", "topk_group", "n_shared_experts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.num_experts % self.n_group:
            raise ValueError(f"num_experts = {self.num_experts} must be a multiple of n_group = {self.n_group}")
        per_group = self.num_experts // self.n_group
        if per_group < 2:  # a group's score is the sum of its two best experts (SGLang, transformers)
            raise ValueError(f"each of the n_group = {self.n_group} groups needs >= 2 experts, got {per_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group = {self.topk_group} exceeds n_group = {self.n_group}")
        if self.topk_group * per_group < self.top_k:
            raise ValueError(f"top_k = {self.top_k} exceeds the {self.topk_group * per_group} experts of "
                             f"topk_group = {self.topk_group} groups")
        v = self.first_k_dense_replace
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.num_layers:
            raise ValueError(f"first_k_dense_replace must be an int in [0, num_layers = {self.num_layers}), got {v!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"norm_topk_prob must be a bool, got {self.norm_topk_prob!r}")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}")
        if not self.bias_scale >= 0:
            raise ValueError(f"bias_scale must be >= 0, got {self.bias_scale!r}")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The ids of the MoE layers (the layers after the dense ones)."""
        return tuple(range(self.first_k_dense_replace, self.num_layers))


@dataclass(frozen=True)
class TinyMixtralSpec(TinyMoeSpec):
    """Shape and seed of a tiny Mixtral (``MixtralForCausalLM``): every layer MoE, softmax top-k, always
    renormalised; ``moe_intermediate_size`` is the experts' width (Mixtral's ``intermediate_size``),
    ``intermediate_size`` is unused (as in the Qwen3-MoE spec)."""

    arch: ClassVar[str] = "mixtral"
    num_experts: int = 8
    top_k: int = 2


#: The named tiny models (``xshare tiny-model --arch NAME``). Router configs:
#: ``qwen3_moe`` softmax top-4 of 16, renormalised, 2 MoE layers;
#: ``glm45`` sigmoid + correction bias, top-4 of 16, one group, renormalised, x2.5, 1 shared expert,
#: layer 0 dense then 2 MoE layers (GLM-4.5: 160 experts, top-8, one group, x2.5, 1 shared, 3 dense layers);
#: ``deepseek_v3_router`` the same architecture with 32 experts in 8 groups of 4, 4 groups kept, top-4
#: (DeepSeek-V3: 256 experts in 8 groups of 32, 4 kept, top-8, x2.5, 1 shared);
#: ``mixtral`` softmax top-2 of 8, renormalised, 2 MoE layers (Mixtral-8x7B: top-2 of 8).
PRESETS: dict[str, TinyMoeSpec] = {
    "qwen3_moe": TinyMoeSpec(),
    "glm45": TinyGlm4MoeSpec(),
    "deepseek_v3_router": TinyGlm4MoeSpec(num_experts=32, n_group=8, topk_group=4),
    "mixtral": TinyMixtralSpec(),
}


def preset(name: str, **overrides: Any) -> TinyMoeSpec:
    """The spec of preset ``name`` (:data:`PRESETS`) with ``overrides`` (fields of its class) replaced."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown tiny model {name!r}; available: {', '.join(PRESETS)}") from None
    unknown = sorted(set(overrides) - {f.name for f in fields(base)})
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a setting of the {base.arch} architecture ({name})")
    return replace(base, **overrides) if overrides else base


def synthetic_corpus(seed: int = 0, num_lines: int = 6000) -> list[str]:
    """Deterministic Python-like lines for training the tokenizer."""
    rng = random.Random(seed)

    def ident() -> str:
        return "_".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))

    lines = []
    for _ in range(num_lines):
        kind = rng.random()
        indent = "    " * rng.randint(0, 2)
        if kind < 0.15:
            args = ", ".join(ident() for _ in range(rng.randint(0, 3)))
            lines.append(f"{indent}def {ident()}({args}):")
        elif kind < 0.35:
            lines.append(f"{indent}{ident()} = {ident()}.{ident()}({ident()}, {rng.randint(0, 4096)})")
        elif kind < 0.5:
            lines.append(f"{indent}{rng.choice(_KEYWORDS)} {ident()} {rng.choice(_KEYWORDS)} {ident()}:")
        elif kind < 0.6:
            lines.append(f"{indent}return {ident()} + {rng.randint(0, 99)} * {ident()}")
        elif kind < 0.7:
            lines.append(f"{indent}# {' '.join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))}")
        elif kind < 0.8:
            lines.append(f"import {ident()}" if rng.random() < 0.5 else f"from {ident()} import {ident()}")
        else:
            lines.append(f"{indent}print(\"{' '.join(rng.choice(_WORDS) for _ in range(rng.randint(1, 5)))}\")")
    return lines


def build_tokenizer(vocab_size: int = 1024, seed: int = 0):  # noqa: ANN201 (PreTrainedTokenizerFast)
    """A byte-level BPE tokenizer trained offline on :func:`synthetic_corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(spec: TinyMoeSpec, vocab_size: int, eos_token_id: int):  # noqa: ANN201 (transformers config)
    """The Hugging Face config of ``spec``'s model (``eos_token_id`` also serves as BOS and padding)."""
    shape = dict(vocab_size=vocab_size, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                 num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                 max_position_embeddings=spec.max_position_embeddings,
                 moe_intermediate_size=spec.moe_intermediate_size, num_experts=spec.num_experts, top_k=spec.top_k,
                 bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    if isinstance(spec, TinyGlm4MoeSpec):
        return glm4_moe_config(**shape, intermediate_size=spec.intermediate_size, n_group=spec.n_group,
                               topk_group=spec.topk_group, routed_scaling_factor=spec.routed_scaling_factor,
                               norm_topk_prob=spec.norm_topk_prob, n_shared_experts=spec.n_shared_experts,
                               first_k_dense_replace=spec.first_k_dense_replace)
    if isinstance(spec, TinyMixtralSpec):
        return mixtral_config(**shape)
    return qwen3_moe_config(**shape, intermediate_size=spec.intermediate_size)


def _manifest_head(spec: TinyMoeSpec) -> dict[str, Any]:
    """What the manifest records of ``spec``: its fields, and its architecture unless Qwen3-MoE (the
    original manifest, unchanged)."""
    head: dict[str, Any] = {"spec": asdict(spec)}
    if spec.arch != TinyMoeSpec.arch:
        head["arch"] = spec.arch
    return head


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_tiny_moe(out_dir: str | Path, spec: TinyMoeSpec | None = None) -> Path:
    """Write the model, tokenizer, generation config and ``manifest.json`` to ``out_dir``.

    If ``out_dir`` already holds a model built from the same spec (its manifest matches and the
    files' hashes check), nothing is rebuilt. Returns ``out_dir``.
    """
    spec = spec or TinyMoeSpec()
    out = Path(out_dir)
    existing = read_manifest(out)
    head = _manifest_head(spec)
    if existing is not None and all(existing.get(k) == v for k, v in head.items()) \
            and existing.get("arch", TinyMoeSpec.arch) == spec.arch and _files_intact(out, existing):
        return out
    if out.exists() and any(out.iterdir()) and existing is None:
        raise FileExistsError(f"{out} is not empty and holds no tiny-model manifest; refusing to overwrite it")

    from transformers import GenerationConfig

    tokenizer = build_tokenizer(spec.vocab_size, spec.seed)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bias_scale = spec.bias_scale if isinstance(spec, TinyGlm4MoeSpec) else 0.0
    model = build_moe(model_config(spec, len(tokenizer), eos), seed=spec.seed,
                      init=ScaledInit(spec.router_scale, spec.expert_scale, bias_scale), dtype=spec.dtype)

    tmp = out.with_name(out.name + ".tmp-build")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False).save_pretrained(tmp)
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({**head, "files": files}, indent=2, sort_keys=True) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def read_manifest(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _files_intact(model_dir: Path, manifest: dict) -> bool:
    files = manifest.get("files", {})
    return bool(files) and all((model_dir / n).is_file() and _sha256(model_dir / n) == h for n, h in files.items())
