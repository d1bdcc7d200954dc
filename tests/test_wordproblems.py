"""rtpo.wordproblems: the generated word-problem task is deterministic, correct, bounded and split
without overlap."""

import re

import pytest

from rtpo import wordproblems
from rtpo.config import DataConfig
from rtpo.data import load_splits

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def rows(n=400, seed=0, **kw):
    return wordproblems.make_dataset(n, seed, **kw)


def test_same_seed_same_rows_other_seed_other_rows():
    assert rows(seed=5) == rows(seed=5)
    a, b = {r["question"] for r in rows(seed=5)}, {r["question"] for r in rows(seed=6)}
    assert len(a & b) < 0.2 * len(a)  # independent draws may repeat a few small problems, not the set


@pytest.mark.parametrize("kw", [dict(min_operands=2, max_operands=2, max_operand=10),
                                dict(min_operands=2, max_operands=3, max_operand=20),
                                dict(min_operands=3, max_operands=5, max_operand=30)])
def test_reasoning_is_worked_lines_whose_last_line_states_the_answer(kw):
    """Every line after the first holds one correct equation; each starts from the previous result
    (or, for the first, from numbers in the question); the last line states the answer, which is a
    non-negative integer equal to the last result."""
    for r in rows(**kw):
        lines = r["reasoning"].split("\n")
        assert lines[-1] == f"The answer is {r['answer']}."
        assert r["answer"].isdigit()
        question_numbers = {int(x) for x in re.findall(r"\d+", r["question"])}
        prev = None
        for line in lines[:-1]:
            m = EQUATION.search(line)
            if m is None:  # "Mia starts with 12 stickers."
                assert prev is None and "starts with" in line
                prev = int(re.search(r"\d+", line).group())
                assert prev in question_numbers
                continue
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert OPS[op](a, b) == c and c >= 0, line
            assert op != "/" or a % b == 0, line
            assert b in question_numbers, (line, r["question"])
            assert a == prev or (prev is None and a in question_numbers), (line, r["reasoning"])
            prev = c
        assert prev == int(r["answer"])


@pytest.mark.parametrize("lo,hi,top", [(2, 2, 10), (2, 3, 20), (3, 5, 30)])
def test_operand_settings_bound_the_problem(lo, hi, top):
    """data.min/max_operands bound how many numbers a question holds, data.max_operand their size
    (factors and divisors at most 9), and all kinds of problem occur."""
    kinds = set()
    for r in rows(min_operands=lo, max_operands=hi, max_operand=top):
        nums = [int(x) for x in re.findall(r"\d+", r["question"])]
        assert lo <= len(nums) <= hi, r["question"]
        assert max(nums) <= top, r["question"]
        kinds.add("share" if "equally" in r["question"] else "shop" if "costs" in r["question"]
                  else "groups" if " in each." in r["question"] else "change")
    assert kinds == {"share", "shop", "groups", "change"}


def test_load_splits_gives_disjoint_train_and_eval():
    cfg = DataConfig(dataset="wordproblems", synthetic_size=1500, num_eval=64, min_operands=2, max_operands=3,
                     max_operand=20)
    train, ev = load_splits(cfg)
    assert len(ev) == 64 and len(train) > 1000
    assert not {e.question for e in train} & {e.question for e in ev}
    assert all(e.reasoning and e.answer.isdigit() for e in train + ev)
    assert load_splits(cfg) == (train, ev)  # deterministic
