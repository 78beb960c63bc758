"""The trained tiny model's character-level tokenizer and its training batches.

One token per character of :data:`xshare.models.tasks.ALPHABET`, plus ``<pad> <bos> <eos> <unk>``
(ids 0..3), as a ``PreTrainedTokenizerFast`` that SGLang loads from the model directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from xshare.models import tasks as T


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
