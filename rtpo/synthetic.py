"""The embedded reasoning task: multi-step integer arithmetic with a worked trace.

    question : "Compute 12+7-5+20."
    reasoning: "12+7=19\\n19-5=14\\n14+20=34"      (one line per step)
    answer   : "34"

Like GSM8K, the trace ends by stating the answer, so cutting it from the end removes the answer
first, then the later steps. Rows are a pure function of (seed, index): the same seed always gives
the same data, and two seeds give independent splits.
"""

from __future__ import annotations

import random


def make_example(rng: random.Random, min_operands: int = 3, max_operands: int = 5, max_operand: int = 30) -> dict:
    n = rng.randint(min_operands, max_operands)
    value = rng.randint(1, max_operand)
    expr, lines = str(value), []
    for _ in range(n - 1):
        x = rng.randint(1, max_operand)
        op = "-" if x <= value and rng.random() < 0.5 else "+"  # results stay >= 0
        new = value + x if op == "+" else value - x
        lines.append(f"{value}{op}{x}={new}")
        expr += f"{op}{x}"
        value = new
    return {"question": f"Compute {expr}.", "reasoning": "\n".join(lines), "answer": str(value)}


def make_dataset(size: int, seed: int, **kwargs) -> list[dict]:
    rng = random.Random(f"rtpo-synthetic-{seed}")
    return [make_example(rng, **kwargs) for _ in range(size)]


# Disjoint seeds: RL training rows, held-out eval rows, supervised warm-start rows.
TRAIN_SEED, EVAL_SEED, WARMSTART_SEED = 1, 2, 3
