"""Train the tiny Qwen3-MoE model on the synthetic tasks (CPU, deterministic), evaluate it offline.

    from xshare.models import train_tiny
    model_dir = train_tiny.ensure_model()                 # build (train) once, then load from the cache
    model, tok = train_tiny.load(model_dir)
    res = train_tiny.evaluate(model, tok, tasks.heldout(500), selector=SelectorConfig("xshare", budget=16))

The model is a ``Qwen3MoeForCausalLM`` in Hugging Face format (safetensors, per-expert weights as
SGLang loads them) with its own character-level tokenizer (``PreTrainedTokenizerFast``: one token
per character of :data:`xshare.models.tasks.ALPHABET`, plus ``<pad> <bos> <eos> <unk>``), so an
SGLang server loads it from the directory alone. The same :class:`TinyConfig` on the same torch
build, CPU instruction set and thread count gives the same weights bit for bit
(:func:`weights_sha256`); ``manifest.json`` records the config, the hashes and the platform.

Training: float32 on the CPU, AdamW, loss on the answer and EOS tokens only, plus the router's
load-balancing loss (``router_aux_loss_coef``) so that every expert is used. The experts run
through a sorted per-expert loop (the computation of SGLang's ``moe_forward_native``), which is
faster on the CPU than the library's default loop and gives the same function.

Offline evaluation (:func:`evaluate`) decodes greedily with a KV cache; with ``selector`` set, the
router of every MoE layer is replaced by :func:`xshare.selection.select` over the batch's live
rows (finished requests and left padding are excluded), on decode steps only unless
``select_prefill`` — what the SGLang plugin does by default.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xshare.models import tasks as T

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
SORTED_EXPERTS = "xshare_sorted"
CACHE_ENV = "XSHARE_CACHE_DIR"
MODEL_DIR_ENV = "XSHARE_TINY_MODEL"
FORMAT_VERSION = 2  # 2: padding rows skip the experts in training; fused AdamW


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyConfig:
    """Model shape and training recipe. Every field takes part in the model's identity (hash)."""

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
        return TinyConfig.from_dict({**self.to_dict(), **kw})

    def identity(self) -> str:
        """A short hash of the config and the recipe version (names cache directories)."""
        blob = json.dumps({"format": FORMAT_VERSION, **self.to_dict()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# tokenizer and model
# --------------------------------------------------------------------------------------------
def build_tokenizer():  # noqa: ANN201 (transformers.PreTrainedTokenizerFast)
    """The character-level tokenizer: ids 0..3 are ``<pad> <bos> <eos> <unk>``, then the alphabet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*T.SPECIALS, *T.ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=T.UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=T.BOS, eos_token=T.EOS, pad_token=T.PAD,
                                   unk_token=T.UNK, padding_side="left", clean_up_tokenization_spaces=False)
    fast.model_max_length = 64
    return fast


def model_config(cfg: TinyConfig):  # noqa: ANN201 (transformers.Qwen3MoeConfig)
    from transformers import Qwen3MoeConfig

    ids = {name: i for i, name in enumerate(T.SPECIALS)}
    return Qwen3MoeConfig(
        vocab_size=len(T.SPECIALS) + len(T.ALPHABET),
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,  # unused: every layer is sparse
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        tie_word_embeddings=False,
        bos_token_id=ids[T.BOS],
        eos_token_id=ids[T.EOS],
        pad_token_id=ids[T.PAD],
    )


def build_model(cfg: TinyConfig):  # noqa: ANN201 (transformers.Qwen3MoeForCausalLM)
    """A freshly initialised model (float32), deterministic in ``cfg.seed``."""
    from transformers import Qwen3MoeForCausalLM

    with _fork_rng(cfg.seed):
        model = Qwen3MoeForCausalLM(model_config(cfg))
    return model.float()


@contextlib.contextmanager
def _fork_rng(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------
# experts forward used for training: sorted per-expert loop (as SGLang's moe_forward_native)
# --------------------------------------------------------------------------------------------
_TRAIN_TOKEN_MASK: list[torch.Tensor | None] = [None]  # flat bool [B*T] of the batch being trained


@contextlib.contextmanager
def _skip_padding(attention_mask: torch.Tensor) -> Iterator[None]:
    """Padding rows skip the experts while the block runs. Right padding and causal attention: no
    real token ever reads a padding row, and padding carries no label, so the loss and every
    gradient are those of the full computation; only the wasted expert work goes."""
    _TRAIN_TOKEN_MASK[0] = attention_mask.reshape(-1).bool()
    try:
        yield
    finally:
        _TRAIN_TOKEN_MASK[0] = None


def sorted_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """Same function as transformers' eager ``Qwen3MoeExperts.forward``, fewer ops on the CPU
    (and, while training, no expert work on padding rows: :func:`_skip_padding`)."""
    num_tokens, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    weights = top_k_weights.reshape(-1)
    token = torch.arange(num_tokens * k, device=flat.device) // k
    mask = _TRAIN_TOKEN_MASK[0]
    if mask is not None and mask.shape[0] == num_tokens:
        keep = mask.repeat_interleave(k)
        flat, weights, token = flat[keep], weights[keep], token[keep]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()
    token = token[order]
    x = hidden_states[token]
    # unbind once: indexing the stacked parameter per expert would make autograd build a full-size
    # zero gradient for every expert (quadratic in the number of experts)
    w13, w2 = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
    outs = []
    for e, xs in enumerate(x.split(counts)):
        if xs.shape[0] == 0:
            continue
        gate, up = F.linear(xs, w13[e]).chunk(2, dim=-1)
        outs.append(F.linear(self.act_fn(gate) * up, w2[e]))
    y = torch.cat(outs) * weights[order, None].to(hidden_states.dtype)
    return torch.zeros_like(hidden_states).index_add_(0, token, y)


def _register_sorted_experts() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(SORTED_EXPERTS, sorted_experts_forward)


@contextlib.contextmanager
def experts_implementation(model: torch.nn.Module, name: str | None) -> Iterator[None]:
    """Temporarily run the model's experts with ``name`` (``"eager"``, :data:`SORTED_EXPERTS`, ...)."""
    if name is None:
        yield
        return
    if name == SORTED_EXPERTS:
        _register_sorted_experts()
    old = model.config._experts_implementation
    model.config._experts_implementation = name
    try:
        yield
    finally:
        model.config._experts_implementation = old


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def encode_problem(tokenizer: Any, problem: T.Problem) -> tuple[list[int], int]:
    """Token ids of ``prompt + answer + <eos>`` and the prompt's length in tokens."""
    prompt = tokenizer.encode(problem.prompt, add_special_tokens=False)
    answer = tokenizer.encode(problem.answer, add_special_tokens=False)
    return [*prompt, *answer, tokenizer.eos_token_id], len(prompt)


def training_batch(tokenizer: Any, problems: Sequence[T.Problem]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 except answer and EOS)."""
    encoded = [encode_problem(tokenizer, p) for p in problems]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
        labels[i, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _lr_at(cfg: TinyConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: Any
    tokenizer: Any
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean answer loss per logging window
    aux_losses: list[float] = field(default_factory=list)


def train(cfg: TinyConfig, *, log: Callable[[str], None] | None = None, log_every: int = 100,
          callback: Callable[[int, Any], None] | None = None) -> TrainResult:
    """Train a model from scratch with ``cfg`` (deterministic); returns it in eval mode.

    ``callback(step, model)`` runs after every ``log_every`` steps (e.g. a held-out evaluation; it
    must leave the model's parameters and the global RNG alone)."""
    import itertools

    tokenizer = build_tokenizer()
    model = build_model(cfg)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, fused=True)
    stream = T.training_problems(cfg.seed, cfg.tasks, dict(cfg.task_weights))
    res = TrainResult(model=model, tokenizer=tokenizer, seconds=0.0)
    window: list[float] = []
    aux_window: list[float] = []
    t0 = time.perf_counter()
    with _deterministic(cfg.threads), experts_implementation(model, SORTED_EXPERTS), _fork_rng(cfg.seed):
        for step in range(cfg.steps):
            batch = training_batch(tokenizer, list(itertools.islice(stream, cfg.batch_size)))
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, step)
            with _skip_padding(batch["attention_mask"]):
                out = model(**batch, output_router_logits=True, use_cache=False)
                out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            aux = float(out.aux_loss.detach())
            window.append(float(out.loss.detach()) - cfg.router_aux_loss_coef * aux)
            aux_window.append(aux)
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                res.losses.append(sum(window) / len(window))
                res.aux_losses.append(sum(aux_window) / len(aux_window))
                window, aux_window = [], []
                if log is not None:
                    el = time.perf_counter() - t0
                    log(f"step {step + 1}/{cfg.steps}  loss {res.losses[-1]:.4f}  aux {res.aux_losses[-1]:.3f}  "
                        f"lr {_lr_at(cfg, step):.2e}  {el:.0f} s")
                if callback is not None:
                    model.eval()
                    with torch.random.fork_rng(devices=[]):
                        callback(step + 1, model)
                    model.train()
    res.seconds = time.perf_counter() - t0
    model.eval()
    return res


# --------------------------------------------------------------------------------------------
# hashing, saving, loading
# --------------------------------------------------------------------------------------------
def state_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """SHA-256 of the saved weights file."""
    return _file_sha256(Path(model_dir) / WEIGHTS)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def platform_info() -> dict[str, Any]:
    """What bit-for-bit reproducibility depends on besides the config."""
    import transformers

    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1]
                break
    isa = sorted(f for f in flags.split() if f.startswith(("avx", "fma", "amx", "sse4")))
    return {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "cpu_isa": isa, "mkldnn": torch.backends.mkldnn.is_available()}


def read_manifest(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON manifest ({exc})") from exc
    if not isinstance(data, dict) or "config" not in data or "files" not in data:
        raise ValueError(f"{path}: manifest lacks 'config' or 'files'")
    return data


def save(result: TrainResult, cfg: TinyConfig, out_dir: str | os.PathLike, *,
         extra: dict[str, Any] | None = None) -> Path:
    """Write model, tokenizer, generation config and ``manifest.json`` to ``out_dir`` atomically."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model, tok = result.model, result.tokenizer
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        gen = GenerationConfig(do_sample=False, max_new_tokens=T.MAX_ANSWER_CHARS + 1,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id)
        gen.save_pretrained(tmp)
        files = {p.name: _file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format": FORMAT_VERSION,
            "identity": cfg.identity(),
            "config": cfg.to_dict(),
            "state_sha256": state_sha256(model),
            "weights_sha256": files[WEIGHTS],
            "files": files,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(result.seconds, 1),
            "final_loss": result.losses[-1] if result.losses else None,
            "losses": [round(x, 5) for x in result.losses],
            "aux_losses": [round(x, 5) for x in result.aux_losses],
            "platform": platform_info(),
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_intact(model_dir: str | os.PathLike, cfg: TinyConfig | None = None) -> bool:
    """True iff ``model_dir`` holds a complete model whose files match its manifest (and ``cfg``)."""
    d = Path(model_dir)
    try:
        man = read_manifest(d)
    except ValueError:
        return False
    if man is None:
        return False
    if cfg is not None and man.get("config") != cfg.to_dict():
        return False
    files = man.get("files", {})
    if WEIGHTS not in files:
        return False
    return all((d / name).is_file() and _file_sha256(d / name) == digest for name, digest in files.items())


def load(model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a model directory."""
    from transformers import AutoTokenizer, Qwen3MoeForCausalLM

    d = Path(model_dir)
    if not (d / "config.json").is_file() or not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d}: no model (config.json and {WEIGHTS} expected)")
    model = Qwen3MoeForCausalLM.from_pretrained(d, dtype=dtype)
    model.eval()
    tok = AutoTokenizer.from_pretrained(d)
    tok.padding_side = "left"
    return model, tok


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "xshare"


def default_model_dir(cfg: TinyConfig | None = None) -> Path:
    """``$XSHARE_TINY_MODEL`` if set, else ``<cache>/tiny-moe-<config hash>``."""
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return Path(env)
    return default_cache_dir() / f"tiny-moe-{(cfg or TinyConfig()).identity()}"


def _lock(path: Path) -> Any:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "w")  # noqa: SIM115 - closed by the caller
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def ensure_model(model_dir: str | os.PathLike | None = None, cfg: TinyConfig | None = None, *,
                 log: Callable[[str], None] | None = print, eval_problems: int = 500) -> Path:
    """Return a directory holding the trained model for ``cfg``: load it if it is there and intact,
    else train it (≈ the time in docs/model.md), evaluate it on held-out problems and save it.

    ``model_dir`` defaults to :func:`default_model_dir` (``$XSHARE_TINY_MODEL`` or the cache). A
    directory that holds something else than a model of this config is replaced only if it holds
    a manifest (a model built here); otherwise a ``FileExistsError`` names it.
    """
    cfg = cfg or TinyConfig()
    d = Path(model_dir) if model_dir is not None else default_model_dir(cfg)
    if model_intact(d, cfg):
        return d
    lock = _lock(d.with_name(f".{d.name}.lock"))
    try:
        if model_intact(d, cfg):  # built by another process while we waited
            return d
        if d.exists() and any(d.iterdir()):
            try:
                man = read_manifest(d)
            except ValueError:
                man = None
            if man is None:
                raise FileExistsError(f"{d} is not empty and holds no tiny-model manifest; refusing to replace it")
        if log is not None:
            log(f"training the tiny MoE model ({cfg.identity()}) into {d}")
        res = train(cfg, log=log)
        extra: dict[str, Any] = {}
        if eval_problems:
            ev = evaluate(res.model, res.tokenizer, T.heldout(eval_problems, seed=0, tasks=cfg.tasks))
            extra["heldout"] = {"problems": eval_problems, "seed": 0, "accuracy": ev["accuracy"]}
            if log is not None:
                log("held-out exact match: " + ", ".join(f"{k} {v:.3f}" for k, v in ev["accuracy"].items()))
        return save(res, cfg, d, extra=extra)
    finally:
        lock.close()


def check_reproducible(model_dir: str | os.PathLike, *, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Retrain from the manifest's config and compare the weights' hash with the manifest's."""
    man = read_manifest(model_dir)
    if man is None:
        raise FileNotFoundError(f"{model_dir}: no {MANIFEST}")
    cfg = TinyConfig.from_dict(man["config"])
    res = train(cfg, log=log)
    got = state_sha256(res.model)
    same_platform = platform_info() == man.get("platform")
    return {"expected": man["state_sha256"], "got": got, "match": got == man["state_sha256"],
            "same_platform": same_platform, "seconds": round(res.seconds, 1)}


# --------------------------------------------------------------------------------------------
# offline evaluation: greedy decoding with an optional batch-aware routing override
# --------------------------------------------------------------------------------------------
def _moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]


class RoutingOverride:
    """Replaces the router of every MoE layer by :func:`xshare.selection.select` over the live rows.

    The caller sets :attr:`valid` (bool, one per flattened row), :attr:`groups` (request id per
    row), :attr:`row_task` (task index per row) and :attr:`phase` before each forward. Rows not
    valid (left padding, finished requests) are routed as the model does and do not count. With
    ``selector=None`` the routing is the model's own and only statistics are recorded.
    """

    def __init__(self, model: torch.nn.Module, selector: Any = None, *, select_prefill: bool = False,
                 num_tasks: int = len(T.TASKS)) -> None:
        from xshare.selection import SelectorConfig

        if selector is not None and not isinstance(selector, SelectorConfig):
            raise ValueError(f"selector must be a SelectorConfig or None, got {type(selector).__name__}")
        self.model = model
        self.selector = selector
        self.select_prefill = select_prefill
        self.blocks = _moe_blocks(model)
        if not self.blocks:
            raise ValueError("the model has no MoE layer (mlp.gate)")
        cfg = model.config
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.valid: torch.Tensor | None = None
        self.groups: torch.Tensor | None = None
        self.row_task: torch.Tensor | None = None
        self.phase = "prefill"
        n_layers = len(self.blocks)
        # per phase: list over forwards of per-layer (activated, vanilla activated, rows)
        self.records: dict[str, list[list[tuple[int, int, int]]]] = {"prefill": [], "decode": []}
        self.usage = {ph: torch.zeros(n_layers, num_tasks, self.num_experts, dtype=torch.long)
                      for ph in ("prefill", "decode")}
        self._current: list[tuple[int, int, int]] | None = None

    def __enter__(self) -> RoutingOverride:
        for i, block in enumerate(self.blocks):
            gate = block.gate
            gate.forward = (lambda hs, _g=gate, _i=i: self._route(_g, _i, hs))
        return self

    def __exit__(self, *exc: object) -> None:
        for block in self.blocks:
            if "forward" in vars(block.gate):
                del block.gate.forward

    def begin_forward(self, phase: str, valid: torch.Tensor, groups: torch.Tensor, row_task: torch.Tensor) -> None:
        self.phase, self.valid, self.groups, self.row_task = phase, valid, groups, row_task
        self._current = [(0, 0, 0)] * len(self.blocks)
        self.records[phase].append(self._current)

    def _route(self, gate: torch.nn.Module, layer: int, hidden_states: torch.Tensor) -> tuple:
        from xshare.selection import select

        hs = hidden_states.reshape(-1, gate.hidden_dim)
        logits = F.linear(hs, gate.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top_v, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_v = top_v / top_v.sum(dim=-1, keepdim=True)
        valid = self.valid if self.valid is not None else torch.ones(hs.shape[0], dtype=torch.bool)
        if valid.shape[0] != hs.shape[0]:
            raise RuntimeError(f"routing override: {valid.shape[0]} row flags for {hs.shape[0]} rows")
        rows = valid.nonzero().squeeze(1)
        vanilla_active = int(torch.unique(top_i[rows]).numel())
        active = vanilla_active
        if self.selector is not None and rows.numel() and (self.phase == "decode" or self.select_prefill):
            groups = self.groups[rows] if self.groups is not None else None
            r = select(logits[rows].float(), self.top_k, self.selector, groups=groups)
            top_i = top_i.clone()
            top_v = top_v.clone()
            top_i[rows] = r.topk_ids.long()
            top_v[rows] = r.topk_weights.to(top_v.dtype)
            active = int(r.active.sum())
        if self._current is not None:
            self._current[layer] = (active, vanilla_active, int(rows.numel()))
        if self.row_task is not None and rows.numel():
            task = self.row_task[rows].unsqueeze(1).expand(-1, self.top_k)
            flat = task.reshape(-1) * self.num_experts + top_i[rows].reshape(-1)
            counts = torch.bincount(flat, minlength=self.usage[self.phase].shape[1] * self.num_experts)
            self.usage[self.phase][layer] += counts.view(-1, self.num_experts)
        return logits, top_v.to(logits.dtype), top_i

    def summary(self, phase: str = "decode") -> dict[str, Any]:
        """Mean activated experts per layer (and what vanilla top-k would activate on the same rows)."""
        recs = [r for r in self.records[phase] if r and r[0][2] > 0]
        if not recs:
            return {"forwards": 0}
        n_layers = len(self.blocks)
        act = [sum(r[i][0] for r in recs) / len(recs) for i in range(n_layers)]
        van = [sum(r[i][1] for r in recs) / len(recs) for i in range(n_layers)]
        rows = sum(r[0][2] for r in recs) / len(recs)
        return {"forwards": len(recs), "mean_rows": rows, "activated_per_layer": act,
                "activated": sum(act) / n_layers, "vanilla_per_layer": van, "vanilla": sum(van) / n_layers}


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                  override: RoutingOverride | None = None, row_task: torch.Tensor | None = None,
                  timings: dict[str, float] | None = None) -> list[list[int]]:
    """Greedy decoding of a batch (left padding, KV cache); stops a row at EOS. Returns new token ids."""
    from transformers import DynamicCache

    enc = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    if not enc:
        return []
    b, width = len(enc), max(len(e) for e in enc)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = torch.arange(b)
    task = row_task if row_task is not None else torch.zeros(b, dtype=torch.long)
    cache = DynamicCache(config=model.config)
    if override is not None:
        override.begin_forward("prefill", mask.reshape(-1).bool(), rows.repeat_interleave(width),
                               task.repeat_interleave(width))
    t0 = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    t1 = time.perf_counter()
    nxt = out.logits[:, -1].argmax(-1)
    live = torch.ones(b, dtype=torch.bool)
    generated: list[list[int]] = [[] for _ in range(b)]
    decode_s, decode_tokens = 0.0, 0
    for step in range(max_new_tokens):
        for i in live.nonzero().squeeze(1).tolist():
            generated[i].append(int(nxt[i]))
            if int(nxt[i]) == eos:
                live[i] = False
        if not bool(live.any()) or step + 1 == max_new_tokens:
            break
        cur = mask.sum(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
        if override is not None:
            override.begin_forward("decode", live.clone(), rows, task)
        ts = time.perf_counter()
        out = model(input_ids=torch.where(live, nxt, pad).unsqueeze(1), attention_mask=mask, position_ids=cur,
                    past_key_values=cache, use_cache=True)
        decode_s += time.perf_counter() - ts
        decode_tokens += int(live.sum())
        nxt = out.logits[:, -1].argmax(-1)
    if timings is not None:
        timings["prefill_s"] = timings.get("prefill_s", 0.0) + (t1 - t0)
        timings["decode_s"] = timings.get("decode_s", 0.0) + decode_s
        timings["decode_tokens"] = timings.get("decode_tokens", 0) + decode_tokens
    return generated


def evaluate(model: torch.nn.Module, tokenizer: Any, problems: Sequence[T.Problem], *, selector: Any = None,
             batch_size: int = 16, select_prefill: bool = False, return_texts: bool = False) -> dict[str, Any]:
    """Exact match per task and overall of greedy decoding in batches of ``batch_size``.

    ``selector`` (a :class:`xshare.selection.SelectorConfig` or None for the model's own top-k)
    replaces the routing of every MoE layer over each batch's live rows (decode steps only unless
    ``select_prefill``). Also returns activated experts per layer on decode steps (and what top-k
    activates on the same rows), per-task expert usage, and decode tokens/s of this process.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    task_index = {t: i for i, t in enumerate(T.TASKS)}
    texts: list[str] = []
    timings: dict[str, float] = {}
    with RoutingOverride(model, selector, select_prefill=select_prefill) as ov:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            row_task = torch.tensor([task_index[p.task] for p in chunk], dtype=torch.long)
            gen = greedy_decode(model, tokenizer, [p.prompt for p in chunk], max_new_tokens=T.MAX_ANSWER_CHARS + 1,
                                override=ov, row_task=row_task, timings=timings)
            texts.extend(tokenizer.decode(g, skip_special_tokens=False) for g in gen)
    res: dict[str, Any] = {
        "problems": len(problems),
        "batch_size": batch_size,
        "selector": None if selector is None else selector.to_dict(),
        "accuracy": T.accuracy(problems, texts),
        "decode": ov.summary("decode"),
        "prefill": ov.summary("prefill"),
        "decode_tokens": int(timings.get("decode_tokens", 0)),
        "decode_seconds": round(timings.get("decode_s", 0.0), 4),
        "usage_decode": ov.usage["decode"].tolist(),
    }
    ds = timings.get("decode_s", 0.0)
    res["decode_tokens_per_s"] = res["decode_tokens"] / ds if ds > 0 else None
    if return_texts:
        res["texts"] = texts
    return res


def task_specialisation(usage: Sequence[Sequence[Sequence[int]]], tasks: Sequence[str] = T.TASKS) -> dict[str, Any]:
    """From per-layer [task, expert] counts: each task's share of routed slots per expert, the
    mean total-variation distance between tasks' expert distributions, and each task's top experts."""
    u = torch.tensor(usage, dtype=torch.float64)
    per_layer = []
    for layer in u:
        dist = layer / layer.sum(-1, keepdim=True).clamp(min=1)
        present = [i for i in range(len(tasks)) if layer[i].sum() > 0]
        tv = [0.5 * float((dist[a] - dist[b]).abs().sum()) for ai, a in enumerate(present) for b in present[ai + 1:]]
        per_layer.append({
            "mean_tv_distance": sum(tv) / len(tv) if tv else 0.0,
            "top_experts": {tasks[i]: torch.argsort(dist[i], descending=True)[:4].tolist() for i in present},
            "experts_for_90pct": {tasks[i]: int((torch.cumsum(torch.sort(dist[i], descending=True).values, 0)
                                                  < 0.9).sum()) + 1 for i in present},
        })
    return {"layers": per_layer}


@torch.no_grad()
def profile_decode(model: torch.nn.Module, tokenizer: Any, problems: Sequence[T.Problem], *, steps: int = 8,
                   experts_impl: str | None = None, repeats: int = 3) -> dict[str, Any]:
    """Share of an HF decode step spent in the MoE blocks, at batch ``len(problems)``.

    Prefills the prompts, then times ``steps`` decode steps (``repeats`` times, best kept) with
    timers around every ``Qwen3MoeSparseMoeBlock`` (router + experts)."""
    from transformers import DynamicCache

    blocks = _moe_blocks(model)
    acc = {"moe": 0.0}
    starts: dict[int, float] = {}

    def pre(mod: torch.nn.Module, args: Any) -> None:
        starts[id(mod)] = time.perf_counter()

    def post(mod: torch.nn.Module, args: Any, out: Any) -> None:
        acc["moe"] += time.perf_counter() - starts.pop(id(mod))

    handles = [b.register_forward_pre_hook(pre) for b in blocks] + [b.register_forward_hook(post) for b in blocks]
    best: dict[str, float] | None = None
    try:
        with experts_implementation(model, experts_impl):
            for _ in range(repeats):
                enc = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
                b, width = len(enc), max(len(e) for e in enc)
                ids = torch.full((b, width), tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((b, width), dtype=torch.long)
                for i, e in enumerate(enc):
                    ids[i, width - len(e):] = torch.tensor(e)
                    mask[i, width - len(e):] = 1
                cache = DynamicCache(config=model.config)
                out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
                nxt = out.logits[:, -1].argmax(-1)
                acc["moe"] = 0.0
                total = 0.0
                for _ in range(steps):
                    cur = mask.sum(-1, keepdim=True)
                    mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
                    t = time.perf_counter()
                    out = model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=cur,
                                past_key_values=cache, use_cache=True)
                    total += time.perf_counter() - t
                    nxt = out.logits[:, -1].argmax(-1)
                if best is None or total < best["total"]:
                    best = {"total": total, "moe": acc["moe"]}
    finally:
        for h in handles:
            h.remove()
    assert best is not None
    return {"batch": len(problems), "steps": steps, "experts_impl": experts_impl or "eager",
            "step_ms": 1000 * best["total"] / steps, "moe_ms": 1000 * best["moe"] / steps,
            "moe_share": best["moe"] / best["total"]}
