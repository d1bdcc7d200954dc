"""What one training step's stages hand each other: typed, one row per completion.

    Trainer.rollout -> Rollout -> Trainer.score -> Scores -> Trainer.update

A step's rows come in groups: row r is completion r % G of prompt r // G (`expand`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


def expand(per_group: list, G: int) -> list:
    """One entry per row from one per group (prompt): [a, b] -> [a]*G + [b]*G."""
    return [x for x in per_group for _ in range(G)]


@dataclass
class Rollout:
    """G completions of each of the step's prompts (this process's share of them)."""
    keep: float                      # the schedule's hint fraction at this step
    idx: list                        # train-row index of each group
    keeps: list                      # each group's hint fraction (its own with curriculum.per_example)
    hint_targets: list               # each group's (context, target) ids for the hint loss
    hinted_rows: int                 # rows per group that carry the hint (the last ones of the group)
    prompts: list = field(default_factory=list)           # per row: prompt token ids
    completions: list = field(default_factory=list)       # per row: completion token ids
    finish_reasons: list = field(default_factory=list)
    injected: list = field(default_factory=list)          # per row: hint tokens in the prompt
    prefixes: list = field(default_factory=list)          # per row: the hint text the completion continues
    row_keep: list = field(default_factory=list)          # per row: its hint fraction (0 without hint)
    rollout_logprobs: list = field(default_factory=list)  # per row: the sampler's log-probs (or None)
    answers: list = field(default_factory=list)
    questions: list = field(default_factory=list)
    images: Optional[list] = None  # per row: its rtpo.vision.ImageInputs (None: a run without images)
    sft_targets: list = field(default_factory=list)       # per group: (hint-free prompt, whole response) ids

    def __len__(self) -> int:
        return len(self.completions)


@dataclass
class Scores:
    """Rewards of a Rollout's rows and their group advantages (over all processes' groups)."""
    rewards: torch.Tensor            # [rows] total reward
    per_fn: dict                     # reward function name -> per-row values
    accuracy: list                   # per row
    texts: list                      # per row: decoded completion
    group_idx: list                  # train-row index of every group (all processes')
    group_keeps: list                # hint fraction of every group (all processes')
    advantages: Optional[torch.Tensor] = None  # [rows] this process's rows


@dataclass
class LossRows:
    """Every row of a Rollout as the update's log-prob passes see it: with loss.hint_advantage a hinted
    row's prompt is the hint's context and its completion starts with the injected hint (hint_lens[r]
    tokens, credited with the row's advantage); otherwise the rollout's own prompt and completion."""
    prompts: list
    completions: list
    hint_lens: list       # per row: injected tokens at the start of its completion (0: none)
    hint_kept: list       # per row: how many of them enter the loss (loss.hint_top_entropy)


@dataclass
class Supervised:
    """One log-likelihood term of an update (hint loss or SFT loss): target rows after their contexts."""
    name: str
    contexts: list
    targets: list
    images: list
    weight: float
    n_tokens: int = 0     # the term's target tokens over the whole update (all processes): its normaliser
