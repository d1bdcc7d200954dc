"""A generated image task for vision-language models (`--dataset shapes`): count the squares of one colour.

    image    : 56 x 56 pixels, a 4 x 4 grid of 14-pixel cells, some holding a red, green or blue square
    question : "How many red squares?"
    reasoning: "1+0=1\\n1+2=3\\n3+1=4"     the count in each quarter of the image (top left, top right,
                                          bottom left, bottom right), added up one quarter per line
    answer   : "4"

A cell is one 14-pixel patch of the embedded VLM's vision tower and a quarter (2 x 2 cells) is one of
its 4 image tokens, so each count in the trace is read off one image token; the total in one go means
adding four of them in the head. Like the embedded arithmetic task, the trace ends by stating the
answer, so cutting it from the end removes the answer first. data.min_operands / data.max_operands set
the number of squares in an image (of any colour). Rows are a pure function of (seed, index).
"""

from __future__ import annotations

import random

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220)}
GRID, CELL, MARGIN = 4, 14, 2  # a 4x4 grid of 14-pixel cells: 56x56 pixels; squares inset by 2 pixels
BACKGROUND = (255, 255, 255)


def draw(cells: dict):
    """The image of {(row, col): colour name} (PIL, RGB)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (GRID * CELL, GRID * CELL), BACKGROUND)
    d = ImageDraw.Draw(im)
    for (r, c), colour in cells.items():
        x, y = c * CELL + MARGIN, r * CELL + MARGIN
        d.rectangle([x, y, x + CELL - 1 - 2 * MARGIN, y + CELL - 1 - 2 * MARGIN], fill=COLOURS[colour])
    return im


def quarter_counts(cells: dict, colour: str) -> list:
    """Squares of `colour` in each quarter: top left, top right, bottom left, bottom right."""
    h = GRID // 2
    return [sum(1 for (r, c), col in cells.items() if col == colour and r // h == qr and c // h == qc)
            for qr in (0, 1) for qc in (0, 1)]


def trace(counts: list) -> str:
    """Running sum over the quarters, one addition per line: "1+0=1\\n1+2=3\\n3+1=4"."""
    lines, total = [], counts[0]
    for x in counts[1:]:
        lines.append(f"{total}+{x}={total + x}")
        total += x
    return "\n".join(lines)


def make_example(rng: random.Random, min_operands: int = 3, max_operands: int = 8) -> dict:
    n = rng.randint(min(min_operands, GRID * GRID), min(max_operands, GRID * GRID))
    where = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    names = list(COLOURS)
    cells = {rc: rng.choice(names) for rc in where}
    colour = rng.choice(names)
    counts = quarter_counts(cells, colour)
    return {"question": f"How many {colour} squares?", "reasoning": trace(counts), "answer": str(sum(counts)),
            "image": draw(cells)}


def make_dataset(size: int, seed: int, min_operands: int = 3, max_operands: int = 8, **_) -> list[dict]:
    rng = random.Random(f"rtpo-shapes-{seed}")
    return [make_example(rng, min_operands, max_operands) for _ in range(size)]


# Disjoint seeds, as in rtpo/synthetic.py: RL training, held-out test, validation, warm-start rows.
TRAIN_SEED, EVAL_SEED, VALIDATION_SEED, WARMSTART_SEED = 1, 4, 2, 3
