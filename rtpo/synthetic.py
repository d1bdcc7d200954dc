"""The embedded reasoning task: multi-step integer arithmetic with a worked trace.

Two trace styles (`data.trace`):

    question : "Compute 12+7-5+20."
    rewrite  : "12+7-5+20\\n19-5+20\\n14+20\\n34"     (default: each line reduces the previous one)
    steps    : "12+7=19\\n19-5=14\\n14+20=34"         (one operation per line, operands from the question)
    answer   : "34"

`rewrite` makes every line a local function of the line above it (add the first two numbers, copy
the rest), which a tiny model can learn to do reliably; `steps` asks it to find the i-th operand in
the question, which a 1M-parameter model does badly. In both, the trace ends by stating the answer,
like GSM8K, so cutting it from the end removes the answer first, then the later steps. Rows are a pure
function of (seed, index): the same seed always gives the same data, and two seeds give independent
splits.
"""

from __future__ import annotations

import random

TRACES = ("rewrite", "steps")


def make_example(rng: random.Random, min_operands: int = 3, max_operands: int = 5, max_operand: int = 30,
                 trace: str = "rewrite", modulus: int = 0) -> dict:
    if trace not in TRACES:
        raise ValueError(f"trace {trace!r} is not one of {TRACES}")
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
    if trace == "steps":
        lines = [f"{values[i]}{terms[i]}={values[i + 1]}" for i in range(n - 1)]
    else:
        lines = [str(values[i]) + "".join(terms[i:]) for i in range(n)]
    question = f"Compute {expr} mod {modulus}." if modulus else f"Compute {expr}."
    return {"question": question, "reasoning": "\n".join(lines), "answer": str(value)}


def make_dataset(size: int, seed: int, **kwargs) -> list[dict]:
    rng = random.Random(f"rtpo-synthetic-{seed}")
    return [make_example(rng, **kwargs) for _ in range(size)]


# Disjoint seeds: RL training rows, held-out eval rows, supervised warm-start rows.
TRAIN_SEED, EVAL_SEED, WARMSTART_SEED = 1, 2, 3
