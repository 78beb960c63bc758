"""A tiny, deterministic Qwen3-MoE model in Hugging Face format, with its own tokenizer.

Nothing is downloaded: the byte-level BPE tokenizer is trained on a synthetic, seeded corpus of
Python-like text generated here, and the weights are drawn from a seeded generator (no
dependence on the library's own initialisers: :class:`xshare.models.architecture.ScaledInit`).
The model is built by the same builder as the trained tiny model
(:func:`xshare.models.architecture.build_qwen3_moe`), in its own shape (:class:`TinyMoeSpec`).
The same arguments give the same files, byte for byte, on the same library versions;
``manifest.json`` records the arguments and file hashes.

The defaults make routing matter: 16 experts, top-4, router logits of unit scale (decisive
top-k), and expert outputs large enough that a different expert choice can change the greedy
tokens. Random weights: the text is gibberish, which is fine for serving tests.

Requires ``transformers`` and ``tokenizers`` (installed with the SGLang CPU stack).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from xshare.models.architecture import DTYPES, ScaledInit, build_qwen3_moe, qwen3_moe_config

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
    """Shape and seed of the tiny model (Qwen3-MoE architecture)."""

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


def model_config(spec: TinyMoeSpec, vocab_size: int, eos_token_id: int):  # noqa: ANN201 (Qwen3MoeConfig)
    """The Hugging Face config of ``spec``'s model (``eos_token_id`` also serves as BOS and padding)."""
    return qwen3_moe_config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        moe_intermediate_size=spec.moe_intermediate_size,
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


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
    if existing is not None and existing.get("spec") == asdict(spec) and _files_intact(out, existing):
        return out
    if out.exists() and any(out.iterdir()) and existing is None:
        raise FileExistsError(f"{out} is not empty and holds no tiny-model manifest; refusing to overwrite it")

    from transformers import GenerationConfig

    tokenizer = build_tokenizer(spec.vocab_size, spec.seed)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model = build_qwen3_moe(model_config(spec, len(tokenizer), eos), seed=spec.seed,
                            init=ScaledInit(spec.router_scale, spec.expert_scale), dtype=spec.dtype)

    tmp = out.with_name(out.name + ".tmp-build")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False).save_pretrained(tmp)
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"spec": asdict(spec), "files": files}, indent=2, sort_keys=True) + "\n")
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
