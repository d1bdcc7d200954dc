"""A natural-language arithmetic task for real chat models: short word problems with worked steps.

    question : "Mia has 12 stickers. Mia buys 7 more stickers. Then Mia gives 5 stickers to Ben.
                How many stickers does Mia have now?"
    reasoning: "Mia starts with 12 stickers.\\nAfter buying 7: 12 + 7 = 19.\\n
                After giving away 5: 19 - 5 = 14.\\nThe answer is 14."
    answer   : "14"

Four kinds of problem: a change chain (+/-), groups (k bags of x, then changes), shopping (k items at a
price, plus extra items) and sharing (changes, then an equal split). Each reasoning line does one
operation; the last line states the answer, so cutting the trace from the end removes the answer
first, then the later steps (as in GSM8K). `data.min_operands` / `max_operands` bound the numbers in
a problem (steps = numbers - 1) and `data.max_operand` bounds each number; factors and divisors stay
at most 9 so a small model is not asked for long multiplication. Answers are non-negative integers.

Rows are a pure function of (seed, index); the train, eval and warm-start seeds differ, and
`rtpo.data.load_splits` removes any eval question from train, so the splits are disjoint.
"""

from __future__ import annotations

import random

NAMES = ["Sam", "Mia", "Leo", "Ava", "Omar", "Lily", "Ben", "Zoe", "Raj", "Emma", "Noah", "Nina", "Tom",
         "Sara", "Ivan", "Maya", "Kofi", "Lena", "Hugo", "Aisha"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "cards",
         "coins", "flowers", "toy cars", "beads", "eggs", "balloons", "crayons"]
GOODS = [("pen", "pens"), ("notebook", "notebooks"), ("ball", "balls"), ("cup", "cups"), ("kite", "kites"),
         ("sandwich", "sandwiches"), ("comic", "comics"), ("plant", "plants"), ("hat", "hats"),
         ("puzzle", "puzzles")]
CONTAINERS = ["bags", "boxes", "jars", "packs", "baskets"]

# (question sentence, reasoning label) for gains and losses; {a} = the person, {b} = someone else
GAINS = [("{a} buys {x} more {items}.", "After buying {x}"),
         ("{a} finds {x} more {items}.", "After finding {x}"),
         ("{b} gives {a} {x} {items}.", "After getting {x} from {b}")]
LOSSES = [("{a} gives {x} {items} to {b}.", "After giving away {x}"),
          ("{a} loses {x} {items}.", "After losing {x}"),
          ("{a} sells {x} {items}.", "After selling {x}")]
MAX_FACTOR = 9


def _changes(rng, value, n, max_operand, a, b, items):
    """n gain/loss steps from `value` (never below 0): (question sentences, reasoning lines, value)."""
    sentences, lines = [], []
    for i in range(n):
        x = rng.randint(min(2, max_operand), max_operand)  # from 2: no "1 more apples"
        gain = x > value or rng.random() < 0.5
        q, label = rng.choice(GAINS if gain else LOSSES)
        new = value + x if gain else value - x
        fmt = dict(a=a, b=b, x=x, items=items)
        sentences.append(("Then " if i else "") + q.format(**fmt))
        lines.append(f"{label.format(**fmt)}: {value} {'+' if gain else '-'} {x} = {new}.")
        value = new
    return sentences, lines, value


def _change_chain(rng, n, max_operand, a, b):
    items = rng.choice(ITEMS)
    start = rng.randint(1, max_operand)
    s, lines, value = _changes(rng, start, n - 1, max_operand, a, b, items)
    question = " ".join([f"{a} has {start} {items}."] + s + [f"How many {items} does {a} have now?"])
    return question, [f"{a} starts with {start} {items}."] + lines, value


def _groups(rng, n, max_operand, a, b):
    items, box = rng.choice(ITEMS), rng.choice(CONTAINERS)
    f = min(max_operand, MAX_FACTOR)
    k, x = rng.randint(2, max(f, 2)), rng.randint(2, max(f, 2))
    s, lines, value = _changes(rng, k * x, n - 2, max_operand, a, b, items)
    question = " ".join([f"{a} has {k} {box} with {x} {items} in each."] + s
                        + [f"How many {items} does {a} have {'now' if s else 'in all'}?"])
    return question, [f"{k} {box} of {x} {items} make {k} * {x} = {k * x} {items}."] + lines, value


def _shopping(rng, n, max_operand, a, b):
    goods = rng.sample(GOODS, min(n - 1, len(GOODS)))
    (one, many) = goods[0]
    f = min(max_operand, MAX_FACTOR)
    k, price = rng.randint(2, max(f, 2)), rng.randint(1, max(f, 1))
    extras = [(g, rng.randint(1, max_operand)) for g, _ in goods[1:]]
    value = k * price
    lines = [f"{k} {many} cost {k} * {price} = {value} dollars."]
    for g, q in extras:
        lines.append(f"Adding the {g}: {value} + {q} = {value + q} dollars.")
        value += q
    buys = [f"{k} {many}"] + [f"a {g} that costs {q} dollars" for g, q in extras]
    listed = buys[0] if len(buys) == 1 else ", ".join(buys[:-1]) + " and " + buys[-1]
    question = f"A {one} costs {price} dollars. {a} buys {listed}. How many dollars does {a} spend?"
    return question, lines, value


def _sharing(rng, n, max_operand, a, b):
    """Changes, then an equal split; the split size is drawn among the divisors of the total, so the
    answer is a whole number. None if the total has no divisor in 2..9 (the caller draws again)."""
    items = rng.choice(ITEMS)
    start = rng.randint(2, max_operand)
    s, lines, value = _changes(rng, start, n - 2, max_operand, a, b, items)
    ways = [d for d in range(2, MAX_FACTOR + 1) if value and value % d == 0 and d < value]
    if not ways:
        return None
    k = rng.choice(ways)
    question = " ".join([f"{a} has {start} {items}."] + s
                        + [f"{'Then ' if s else ''}{a} shares all the {items} equally among {k} friends.",
                           f"How many {items} does each friend get?"])
    lines = [f"{a} starts with {start} {items}."] + lines + [f"Shared among {k} friends: {value} / {k} = {value // k}."]
    return question, lines, value // k


KINDS = [_change_chain, _groups, _shopping, _sharing]


def make_example(rng: random.Random, min_operands: int = 2, max_operands: int = 3, max_operand: int = 20) -> dict:
    n = rng.randint(min_operands, max_operands)
    while True:
        a, b = rng.sample(NAMES, 2)
        kind = rng.choice(KINDS)
        made = kind(rng, n, max_operand, a, b)
        if made is not None:
            break
    question, lines, answer = made
    lines.append(f"The answer is {answer}.")
    return {"question": question, "reasoning": "\n".join(lines), "answer": str(answer)}


def make_dataset(size: int, seed: int, **kwargs) -> list[dict]:
    rng = random.Random(f"rtpo-wordproblems-{seed}")
    return [make_example(rng, **kwargs) for _ in range(size)]


# Disjoint seeds: RL training rows, held-out eval rows, supervised warm-start rows.
TRAIN_SEED, EVAL_SEED, VALIDATION_SEED, WARMSTART_SEED = 11, 12, 14, 13
