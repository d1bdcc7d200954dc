"""The embedded reasoning task: multi-step arithmetic with a worked trace, one operation per line.

    question : "Compute 7+8-5+6 mod 10."          (data.modulus 10, the default)
    reasoning: "7+8=5\\n5-5=0\\n0+6=6"
    answer   : "6"

    question : "Compute 12+7-5+20."               (data.modulus 0: plain non-negative integers)
    reasoning: "12+7=19\\n19-5=14\\n14+20=34"
    answer   : "34"

Modulo 10 every value is one digit: a 1M-parameter model learns each line's fact table in a minute of
warm-start, but cannot do the whole chain in its head (an answer-only guess is right ~10 % of the
time), so writing the steps is what makes it right. Like GSM8K, the trace ends by stating the answer,
so cutting it from the end removes the answer first, then the later steps. Rows are a pure function
of (seed, index): the same seed always gives the same data, and two seeds give independent splits.
"""

from __future__ import annotations

import random


def make_example(rng: random.Random, min_operands: int = 3, max_operands: int = 5, max_operand: int = 30,
                 modulus: int = 0) -> dict:
    n = rng.randint(min_operands, max_operands)
    value = rng.randint(1, max_operand)
    terms, values = [], [value]
    for _ in range(n - 1):
        x = rng.randint(1, max_operand)
        op = "-" if (modulus or x <= value) and rng.random() < 0.5 else "+"  # plain: results stay >= 0
        value = value + x if op == "+" else value - x
        if modulus:
            value %= modulus
        terms.append(f"{op}{x}")
        values.append(value)
    expr = str(values[0]) + "".join(terms)
    lines = [f"{values[i]}{terms[i]}={values[i + 1]}" for i in range(n - 1)]
    question = f"Compute {expr} mod {modulus}." if modulus else f"Compute {expr}."
    return {"question": question, "reasoning": "\n".join(lines), "answer": str(value)}


def make_dataset(size: int, seed: int, **kwargs) -> list[dict]:
    rng = random.Random(f"rtpo-synthetic-{seed}")
    return [make_example(rng, **kwargs) for _ in range(size)]


# Disjoint seeds: RL training rows, held-out test rows (reported), validation rows (for tuning: the
# embedded default was designed on these, seed 2, which were the held-out rows before 2026-12; the
# test rows, seed 4, informed no decision), supervised warm-start rows.
TRAIN_SEED, EVAL_SEED, VALIDATION_SEED, WARMSTART_SEED = 1, 4, 2, 3
