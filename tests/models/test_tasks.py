"""Synthetic tasks of the tiny MoE model: generators, checker, the fixed held-out split."""

import itertools
import random
import re
from collections import Counter

import pytest

from xshare.models import tasks as T

CLOSE = {"(": ")", "[": "]", "{": "}", "<": ">"}


def _solve(p: T.Problem) -> str:
    """An independent reference solution from the prompt alone."""
    m = re.fullmatch(r"([A-Z]):(.*)=", p.prompt)
    assert m, p.prompt
    tag, payload = m.groups()
    assert tag == T.TASK_TAGS[p.task]
    if p.task == "add":
        a, b = payload.split("+")
        return str(int(a) + int(b))
    if p.task == "reverse":
        return "".join(reversed(payload))
    if p.task == "sort":
        return "".join(sorted(payload))
    if p.task == "copy":
        return payload
    if p.task == "brackets":
        stack = []
        for ch in payload:
            if ch in CLOSE:
                stack.append(ch)
            else:
                assert stack and CLOSE[stack.pop()] == ch, f"prompt is not a balanced prefix: {payload}"
        return "".join(CLOSE[c] for c in reversed(stack))
    raise AssertionError(p.task)


def test_problems_are_correct_and_short():
    rng = random.Random(123)
    lengths = Counter()
    for task in T.TASKS:
        for _ in range(2000):
            p = T.make_problem(task, rng)
            assert p.task == task
            assert p.answer == _solve(p)
            assert p.prompt.endswith("=") and len(p.prompt) <= T.MAX_PROMPT_CHARS
            assert 1 <= len(p.answer) <= T.MAX_ANSWER_CHARS
            assert set(p.prompt + p.answer) <= set(T.ALPHABET)
            lengths[task, len(p.answer)] += 1
    # variety: several answer lengths per task, multi-digit sums with carries
    for task in T.TASKS:
        assert len([n for (t, n) in lengths if t == task]) >= 3, task


def test_addition_has_carries_and_three_digit_operands():
    probs = [T.make_problem("add", random.Random(i)) for i in range(500)]
    assert any(len(p.answer) == 4 for p in probs)
    assert any(max(map(len, p.prompt[2:-1].split("+"))) == 3 for p in probs)


def test_alphabet_has_no_duplicates_and_no_specials():
    assert len(set(T.ALPHABET)) == len(T.ALPHABET)
    assert all(len(c) == 1 for c in T.ALPHABET)
    assert not set(T.SPECIALS) & set(T.ALPHABET)


def test_heldout_is_deterministic_distinct_balanced_and_disjoint_from_training():
    a = T.heldout(200, seed=3)
    assert a == T.heldout(200, seed=3)
    assert a != T.heldout(200, seed=4)
    assert len({p.prompt for p in a}) == 200
    assert all(T.is_heldout(p) for p in a)
    counts = Counter(p.task for p in a)
    assert set(counts.values()) == {200 // len(T.TASKS)}
    # every batch of len(TASKS) consecutive problems mixes all tasks (heterogeneous batches)
    assert all(len({p.task for p in a[i:i + 5]}) == 5 for i in range(0, 200, 5))
    train = list(itertools.islice(T.training_problems(seed=0), 20000))
    assert not any(T.is_heldout(p) for p in train)
    assert not {p.prompt for p in train} & {p.prompt for p in a}


def test_training_stream_is_deterministic_and_round_robin():
    a = list(itertools.islice(T.training_problems(seed=1), 50))
    b = list(itertools.islice(T.training_problems(seed=1), 50))
    c = list(itertools.islice(T.training_problems(seed=2), 50))
    assert a == b and a != c
    assert [p.task for p in a[:10]] == list(T.TASKS) * 2
    sub = list(itertools.islice(T.training_problems(seed=1, tasks=["copy", "add"]), 6))
    assert [p.task for p in sub] == ["copy", "add"] * 3


def test_heldout_share_is_about_the_configured_percentage():
    rng = random.Random(0)
    probs = [T.make_problem(T.TASKS[i % 5], rng) for i in range(20000)]
    share = sum(T.is_heldout(p) for p in probs) / len(probs)
    assert abs(share - T.HELDOUT_PERCENT / 100) < 0.01


def test_check_and_accuracy():
    p = T.Problem("add", "A:1+2=", "3")
    assert T.check(p, "3")
    assert T.check(p, " 3<eos>")
    assert T.check(p, "3<eos>99")
    assert not T.check(p, "33")
    assert not T.check(p, "")
    assert not T.check(p, "<eos>3")
    q = T.Problem("copy", "C:ab=", "ab")
    acc = T.accuracy([p, q, q], ["3", "ab", "ba"])
    assert acc == {"add": 1.0, "copy": 0.5, "overall": 2 / 3}
    with pytest.raises(ValueError, match="2 texts"):
        T.accuracy([p, q, q], ["3", "ab"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown task"):
        T.make_problem("divide", random.Random(0))
    with pytest.raises(ValueError, match="unknown task"):
        T.heldout(5, tasks=["add", "nope"])
    with pytest.raises(ValueError, match="non-empty list"):
        T.heldout(5, tasks="add")
    with pytest.raises(ValueError, match="n must be"):
        T.heldout(-1)
    assert T.heldout(0) == []
