"""Synthetic tasks with checkable answers for the tiny MoE model (pure Python, deterministic).

Every problem is a short prompt ``"<T>:<payload>="`` (one upper-case task tag, a colon, the
payload, an equals sign) and a short answer; the model generates the answer and then its EOS
token. The tasks differ in what the model must do with the payload, so that experts specialise
per task and a batch mixing tasks is heterogeneous (as in the XShare paper's mixed-dataset
batches):

    add       ``A:307+95=``      -> ``402``      1–3 digit operands (multi-digit addition with carries)
    reverse   ``R:kqzfe=``       -> ``efzqk``    3–8 lower-case letters, reversed
    sort      ``S:dbkad=``       -> ``abddk``    3–8 lower-case letters, sorted
    copy      ``C:x7gh2=``       -> ``x7gh2``    3–8 letters and digits, copied
    brackets  ``B:([]{<=``       -> ``>})``      a prefix of a balanced bracket string (4 kinds):
                                                 the answer closes every bracket still open

Prompts are at most 22 characters and answers at most 8 (one token per character).

The held-out split is fixed and disjoint from training: a problem is held out iff the SHA-256 of
its prompt falls in the first :data:`HELDOUT_PERCENT` per cent (:func:`is_heldout`); the training
stream (:func:`training_problems`) never yields a held-out problem, whatever the seed.

    from xshare.models import tasks
    probs = tasks.heldout(200, seed=0)           # balanced over tasks, distinct, held-out only
    ok = tasks.check(probs[0], generated_text)   # exact match
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

# Tokenizer alphabet (one token per character) and special tokens.
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
_LETTERS = string.ascii_lowercase
_DIGITS = string.digits
_BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}
_SYMBOLS = ":=+" + "".join(_BRACKETS) + "".join(_BRACKETS.values())
TASK_TAGS: dict[str, str] = {"add": "A", "reverse": "R", "sort": "S", "copy": "C", "brackets": "B"}
TASKS: tuple[str, ...] = tuple(TASK_TAGS)
ALPHABET: tuple[str, ...] = tuple(_DIGITS + _LETTERS + "".join(TASK_TAGS.values()) + _SYMBOLS)

HELDOUT_PERCENT = 10
MAX_PROMPT_CHARS = 22
MAX_ANSWER_CHARS = 8


@dataclass(frozen=True)
class Problem:
    """One problem: ``task`` name, ``prompt`` (ends with ``=``) and the exact ``answer``."""

    task: str
    prompt: str
    answer: str

    def to_dict(self) -> dict[str, str]:
        return {"task": self.task, "prompt": self.prompt, "answer": self.answer}


def _add(rng: random.Random) -> tuple[str, str]:
    a = _number(rng)
    b = _number(rng)
    return f"{a}+{b}", str(a + b)


def _number(rng: random.Random) -> int:
    digits = rng.randint(1, 3)
    return rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = _LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 8)
    return w, w[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 8)
    return w, "".join(sorted(w))


def _copy(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 8, _LETTERS + _DIGITS)
    return w, w


def _brackets(rng: random.Random) -> tuple[str, str]:
    """A prefix of a balanced string with 1–6 brackets left open; the answer closes them."""
    while True:
        length = rng.randint(2, 10)
        stack: list[str] = []
        out: list[str] = []
        for _ in range(length):
            if stack and (len(stack) >= 6 or rng.random() < 0.4):
                out.append(_BRACKETS[stack.pop()])
            else:
                opener = rng.choice(tuple(_BRACKETS))
                stack.append(opener)
                out.append(opener)
        if stack:
            return "".join(out), "".join(_BRACKETS[o] for o in reversed(stack))


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "copy": _copy,
    "brackets": _brackets,
}


def _check_tasks(tasks: Sequence[str] | None) -> tuple[str, ...]:
    if tasks is None:
        return TASKS
    if isinstance(tasks, str) or not len(tasks):
        raise ValueError(f"tasks must be a non-empty list of task names from {list(TASKS)}, got {tasks!r}")
    unknown = [t for t in tasks if t not in _GENERATORS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {list(TASKS)}")
    return tuple(tasks)


def make_problem(task: str, rng: random.Random) -> Problem:
    """Draw one problem of ``task`` from ``rng`` (training or held-out: see :func:`is_heldout`)."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; known tasks: {list(TASKS)}")
    payload, answer = _GENERATORS[task](rng)
    return Problem(task, f"{TASK_TAGS[task]}:{payload}=", answer)


def is_heldout(problem: Problem | str) -> bool:
    """True iff the problem (or prompt) belongs to the fixed held-out split (a hash of the prompt)."""
    prompt = problem.prompt if isinstance(problem, Problem) else problem
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return h % 100 < HELDOUT_PERCENT


def training_problems(seed: int, tasks: Sequence[str] | None = None,
                      weights: Mapping[str, int] | None = None) -> Iterator[Problem]:
    """An endless deterministic stream of training problems, none held out: tasks round-robin,
    each task ``weights[task]`` times per cycle (default 1; e.g. ``{"add": 2}`` for the harder one)."""
    names = _check_tasks(tasks)
    weights = dict(weights or {})
    for task, w in weights.items():
        if task not in names:
            raise ValueError(f"weights: task {task!r} is not among the tasks {list(names)}")
        if not isinstance(w, int) or isinstance(w, bool) or w < 0:
            raise ValueError(f"weights[{task!r}] must be an int >= 0, got {w!r}")
    cycle = [t for t in names for _ in range(weights.get(t, 1))]
    if not cycle:
        raise ValueError("weights leave no task to train on")
    rng = random.Random(f"xshare-train-{seed}")
    while True:
        for task in cycle:
            while True:
                p = make_problem(task, rng)
                if not is_heldout(p):
                    break
            yield p


def heldout(n: int, seed: int = 0, tasks: Sequence[str] | None = None) -> list[Problem]:
    """``n`` distinct held-out problems, tasks round-robin (balanced), deterministic in ``seed``."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    names = _check_tasks(tasks)
    rng = random.Random(f"xshare-heldout-{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        task = names[len(out) % len(names)]
        p = make_problem(task, rng)
        tries += 1
        if tries > 1000 * (n + 10):
            raise RuntimeError(f"could not draw {n} distinct held-out problems")
        if p.prompt in seen or not is_heldout(p):
            continue
        seen.add(p.prompt)
        out.append(p)
    return out


def normalize(text: str) -> str:
    """The answer part of a generated text: up to the first EOS marker, whitespace stripped."""
    return text.split(EOS, 1)[0].strip()


def check(problem: Problem, text: str) -> bool:
    """Exact match of the generated ``text`` (after :func:`normalize`) with the problem's answer."""
    return normalize(text) == problem.answer


def accuracy(problems: Sequence[Problem], texts: Sequence[str]) -> dict[str, float]:
    """Exact match per task and ``overall`` (fractions in [0, 1]); ``texts`` aligned with ``problems``."""
    if len(problems) != len(texts):
        raise ValueError(f"{len(problems)} problems but {len(texts)} texts")
    per: dict[str, list[int]] = {}
    for p, t in zip(problems, texts, strict=True):
        per.setdefault(p.task, []).append(int(check(p, t)))
    out = {task: sum(v) / len(v) for task, v in sorted(per.items())}
    total = sum(sum(v) for v in per.values())
    out["overall"] = total / len(problems) if problems else 0.0
    return out
