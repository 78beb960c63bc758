"""The trained model on disk: save, load, the intact check, hashes and ``manifest.json``.

A model directory holds the model in Hugging Face format (safetensors, per-expert weights as SGLang
loads them), the tokenizer, the generation config and ``manifest.json``: the config, the hashes of
every file and of the state dict, the training losses and the platform (what bit-for-bit
reproducibility depends on besides the config).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xshare.models import tasks as T
from xshare.models.config import FORMAT_VERSION, TinyConfig

if TYPE_CHECKING:
    from xshare.models.training import TrainResult

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def state_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
            "format": getattr(cfg, "format_version", FORMAT_VERSION),
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
    """(model in eval mode, tokenizer) from a model directory (Qwen3-MoE or the aux-loss-free GLM-4.5 model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(model_dir)
    if not (d / "config.json").is_file() or not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d}: no model (config.json and {WEIGHTS} expected)")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    model.eval()
    tok = AutoTokenizer.from_pretrained(d)
    tok.padding_side = "left"
    return model, tok
