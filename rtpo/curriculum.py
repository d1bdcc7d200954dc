"""The RTPO curriculum: how much of each reasoning trace is injected at a step (the prompts that
carry it are assembled in rtpo/prompts.py).

keep(step) in [0, 1] is a pure function of the step (the adaptive schedule excepted, whose state is
checkpointed). Each example keeps floor(keep * n_i) of its own n_i trace tokens, cut from the END;
with `granularity: line` the cut is rounded down to a line boundary.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rtpo.config import CurriculumConfig


# --- schedules: f(r) = fraction of the trace removed at progress r in [0, 1] -------------------
def _linear(r, c):
    return r


def _cosine(r, c):
    return 0.5 * (1.0 - math.cos(math.pi * r))


def _exponential(r, c):
    # f(1) = 1 - exp(-k) < 1: the tail is removed at the end of the anneal (r = 1 -> keep 0).
    return 1.0 if r >= 1 else 1.0 - math.exp(-c.decay_rate * r)


def _piecewise(r, c):
    f = c.values[0]
    for m, v in zip(c.milestones, c.values[1:]):
        if r >= m:
            f = v
    return f


def _constant(r, c):
    return 1.0 - c.value


def _none(r, c):
    return 1.0  # plain GRPO: no hint at any step


SCHEDULES = {
    "linear": _linear,
    "cosine": _cosine,
    "exponential": _exponential,
    "piecewise": _piecewise,
    "constant": _constant,
    "none": _none,
    "adaptive": None,  # driven by accuracy: see adaptive_update
}


def anneal_length(c: CurriculumConfig, max_steps: int) -> int:
    """T: given, or `anneal_fraction` of the steps after warmup (so the run ends with some no-hint
    steps). Never less than 1, and computed from the real run length (the original code's default
    of 1 step made the hint vanish after the first step)."""
    if c.anneal_steps > 0:
        return c.anneal_steps
    return max(1, round(c.anneal_fraction * max(max_steps - c.warmup_steps, 1)))


def anneal_progress(step: int, c: CurriculumConfig, max_steps: int) -> float:
    """r = min(max(step - warmup, 0) / T, 1): how far the anneal is at `step` (0 before, 1 after it)."""
    return min(max(step - c.warmup_steps, 0) / anneal_length(c, max_steps), 1.0)


def sft_weight(step: int, weight: float, decay: str, c: CurriculumConfig, max_steps: int) -> float:
    """loss.sft_loss at `step`: constant (`none`), or weight * (1 - r) (`linear`, CHORD-style decay to 0 at the
    end of the curriculum's anneal)."""
    return weight if decay == "none" else weight * (1.0 - anneal_progress(step, c, max_steps))


def keep_ratio(step: int, c: CurriculumConfig, max_steps: int) -> float:
    """keep(step) = max(floor, 1 - f(r)), r = min(max(step - warmup, 0) / T, 1); keep = 1 during warmup."""
    if c.schedule == "adaptive":
        raise ValueError("the adaptive schedule is stateful: use Curriculum")
    if c.schedule == "constant":
        return c.value
    r = anneal_progress(step, c, max_steps)
    keep = 1.0 - SCHEDULES[c.schedule](r, c)
    return min(1.0, max(c.floor, keep))


def adaptive_update(keep: float, accuracy: float, c: CurriculumConfig) -> float:
    """keep' = keep - step while the batch accuracy >= target, else keep (hold while it drops)."""
    if accuracy >= c.adaptive_target:
        keep = keep - c.adaptive_step
    return max(c.floor, min(1.0, keep))


def per_example_update(keep: float, group_accuracy: float, c: CurriculumConfig) -> float:
    """One example's own keep after a group of its rollouts (AdaBack-style):
    all wrong -> keep + per_example_step; accuracy >= per_example_target -> keep - per_example_step;
    otherwise unchanged. Clipped to [0, 1]."""
    if group_accuracy <= 0.0:
        keep = keep + c.per_example_step
    elif group_accuracy >= c.per_example_target:
        keep = keep - c.per_example_step
    return max(0.0, min(1.0, keep))


def dropout_rows(G: int, hint_dropout: float) -> int:
    """How many of a group's G rows get no hint: round(hint_dropout * G), at most G."""
    return min(G, int(math.floor(hint_dropout * G + 0.5)))


class Curriculum:
    """keep(step) for every schedule; carries the one number of adaptive state for checkpoints.

    The adaptive keep never lags the linear anneal (same warmup, T and floor): it runs ahead of it
    while the batch accuracy stays >= target and holds while accuracy is low, but the linear keep is
    its ceiling, so it still reaches the floor by the end of the anneal and the last steps train on
    the evaluation prompts, as with every other schedule. Without that deadline a task whose
    accuracy falls below the target as soon as the answer is cut (GSM8K-style traces end with it)
    would hold keep near 1 for the whole run."""

    def __init__(self, c: CurriculumConfig, max_steps: int):
        self.c, self.max_steps = c, max_steps
        self.adaptive_keep = 1.0
        self.example_keep: dict[int, float] = {}  # per_example: each example's own keep (per_example_start until observed)

    def _deadline(self, step: int) -> float:
        return keep_ratio(step, replace(self.c, schedule="linear"), self.max_steps)

    def keep(self, step: int) -> float:
        if self.c.schedule == "adaptive":
            return min(self.adaptive_keep, self._deadline(step))  # the deadline is 1 during warmup
        return keep_ratio(step, self.c, self.max_steps)

    def example_keeps(self, step: int, indices: list) -> list:
        """keep for each example: the schedule's keep, or with per_example the smaller of it and
        the example's own keep (the schedule is the ceiling: at schedule keep 0 no example has a hint)."""
        keep = self.keep(step)
        if not self.c.per_example:
            return [keep] * len(indices)
        start = self.c.per_example_start
        return [min(keep, self.example_keep.get(i, start)) for i in indices]

    def observe(self, step: int, accuracy: float) -> None:
        if self.c.schedule == "adaptive" and step >= self.c.warmup_steps:
            self.adaptive_keep = adaptive_update(self.keep(step), accuracy, self.c)

    def observe_examples(self, indices: list, keeps: list, group_accuracies: list) -> None:
        """per_example: move each example's own keep from the keep its group was given."""
        if self.c.per_example:
            for i, k, a in zip(indices, keeps, group_accuracies):
                self.example_keep[int(i)] = per_example_update(k, a, self.c)

    def state_dict(self) -> dict:
        return {"adaptive_keep": self.adaptive_keep, "example_keep": dict(self.example_keep)}

    def load_state_dict(self, d: dict) -> None:
        self.adaptive_keep = float(d["adaptive_keep"])
        self.example_keep = {int(k): float(v) for k, v in d.get("example_keep", {}).items()}
