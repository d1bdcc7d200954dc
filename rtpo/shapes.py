"""A generated image task for vision-language models (`--dataset shapes`): count two colours, multiply.

    image    : 56 x 56 pixels, a 4 x 4 grid of 14-pixel cells, some holding a pink, gold or blue square
    question : "Multiply the number of pink squares by the number of gold squares."
    reasoning: "pink 2\\ngold 3\\n2*3=6"     count each colour, then one fact of the times table
    answer   : "6"

Like the embedded arithmetic task, each step is easy and the whole in one go is not: a count is one
look over the image (a cell is one 14-pixel patch of the embedded VLM's vision tower), the product of
two counts is a table fact once both are written, but answering at once means holding both counts and
multiplying in the head. The trace ends by stating the answer, so cutting it from the end removes the
answer first. 1-3 pink and 1-3 gold squares (products 1..9, the most common 2, 3 and 6 at 2/9 each)
plus data.min_operands .. data.max_operands - 4 blue ones (at least 0). Rows are a pure function of
(seed, index).

A first version asked for one colour and added the four quarters' counts (one line per quarter): the
tiny model never learned to read a count off one quarter (its trace counts stayed at the prior after
600 warm-start steps), and RL then taught it to write wrong traces (accuracy 41 % -> 9 %).
"""

from __future__ import annotations

import random

COLOURS = {"pink": (240, 80, 160), "gold": (230, 180, 0), "blue": (40, 60, 220)}
GRID, CELL, MARGIN = 4, 14, 2  # a 4x4 grid of 14-pixel cells: 56x56 pixels; squares inset by 2 pixels
BACKGROUND = (255, 255, 255)
QUESTION = "Multiply the number of pink squares by the number of gold squares."


def draw(cells: dict):
    """The image of {(row, col): colour name} (PIL, RGB)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (GRID * CELL, GRID * CELL), BACKGROUND)
    d = ImageDraw.Draw(im)
    for (r, c), colour in cells.items():
        x, y = c * CELL + MARGIN, r * CELL + MARGIN
        d.rectangle([x, y, x + CELL - 1 - 2 * MARGIN, y + CELL - 1 - 2 * MARGIN], fill=COLOURS[colour])
    return im


def trace(pink: int, gold: int) -> str:
    return f"pink {pink}\ngold {gold}\n{pink}*{gold}={pink * gold}"


def make_example(rng: random.Random, min_operands: int = 3, max_operands: int = 8) -> dict:
    pink, gold = rng.randint(1, 3), rng.randint(1, 3)
    blue = rng.randint(max(min_operands - 4, 0), max(max_operands - 4, 0))
    where = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], pink + gold + blue)
    cells = dict(zip(where, ["pink"] * pink + ["gold"] * gold + ["blue"] * blue))
    return {"question": QUESTION, "reasoning": trace(pink, gold), "answer": str(pink * gold), "image": draw(cells)}


def make_dataset(size: int, seed: int, min_operands: int = 3, max_operands: int = 8, **_) -> list[dict]:
    rng = random.Random(f"rtpo-shapes-{seed}")
    return [make_example(rng, min_operands, max_operands) for _ in range(size)]


# Disjoint seeds, as in rtpo/synthetic.py: RL training, held-out test, validation, warm-start rows.
TRAIN_SEED, EVAL_SEED, VALIDATION_SEED, WARMSTART_SEED = 1, 4, 2, 3
