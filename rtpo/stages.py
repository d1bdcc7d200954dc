"""What one training step's stages hand each other: typed, one row per completion.

    Sampler.rollout -> Rollout -> Scorer.score -> Scores -> Updater.update

A step's rows come in groups: row r is completion r % G of prompt r // G (`expand`). A group's
prompts are `rtpo.prompts.Prompt` objects, built once per (example, keep); `Rollout.take(rows)` is the
one view of some rows that the update's batches read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite updates); a checkpoint of the last good state was saved."""


def expand(per_group: list, G: int) -> list:
    """One entry per row from one per group (prompt): [a, b] -> [a]*G + [b]*G."""
    return [x for x in per_group for _ in range(G)]


@dataclass
class Rows:
    """Some rows of a Rollout, as a batch reads them (`Rollout.take`)."""
    rows: list                       # the rows' indices in the rollout
    prompts: list                    # per row: prompt token ids (as the update lays it out: `LossRows`)
    completions: list                # per row: completion token ids (ditto)
    images: Optional[list]           # per row: its rtpo.vision.ImageInputs (None: a run without images)
    rollout_logprobs: list           # per row: the sampler's log-probs (or None)
    hint_lens: list                  # per row: injected hint tokens at the start of its completion (0: none)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Rollout:
    """G completions of each of the step's prompts (this process's share of them). Row r of group g
    carries the hinted prompt when r % G >= G - hinted_rows (hint dropout gives the others the plain one)."""
    step: int
    keep: float                      # the schedule's hint fraction at this step
    G: int
    idx: list                        # train-row index of each group
    keeps: list                      # each group's hint fraction (its own with curriculum.per_example)
    examples: list                   # each group's Example
    hinted: list                     # each group's Prompt at its keep
    plain: list                      # each group's Prompt at keep 0 (the evaluation prompt)
    hinted_rows: int                 # rows per group that carry the hint (the last ones of the group)
    completions: list = field(default_factory=list)       # per row: completion token ids
    finish_reasons: list = field(default_factory=list)
    rollout_logprobs: list = field(default_factory=list)  # per row: the sampler's log-probs (or None)
    images: Optional[list] = None  # per row: its rtpo.vision.ImageInputs (None: a run without images)
    sft_targets: list = field(default_factory=list)       # per group: (hint-free prompt, whole response) ids

    def __len__(self) -> int:
        return len(self.completions)

    def is_hinted(self, r: int) -> bool:
        return r % self.G >= self.G - self.hinted_rows

    @property
    def row_prompts(self) -> list:
        """Per row: its Prompt (the G rows of a group share the group's objects)."""
        return [(self.hinted if self.is_hinted(r) else self.plain)[r // self.G] for r in range(len(self))]

    @property
    def prompts(self) -> list:
        """Per row: prompt token ids."""
        return [p.ids for p in self.row_prompts]

    @property
    def injected(self) -> list:
        """Per row: hint tokens in its prompt."""
        return [p.injected for p in self.row_prompts]

    @property
    def row_keep(self) -> list:
        """Per row: its hint fraction (0 without hint)."""
        return [self.keeps[r // self.G] if self.is_hinted(r) else 0.0 for r in range(len(self))]

    @property
    def answers(self) -> list:
        return [ex.answer for ex in expand(self.examples, self.G)]

    @property
    def hint_targets(self) -> list:
        """Per group: (context, target) ids of its hint (the target is [] at keep 0)."""
        return [(p.hint_context, p.hint_target) for p in self.hinted]

    def images_of(self, rows: list) -> list | None:
        """The images of rows `rows` (None for a run without images)."""
        return None if self.images is None else [self.images[i] for i in rows]

    def take(self, rows: list, layout: LossRows | None = None) -> Rows:
        """The rows `rows`: prompts and completions as `layout` has them (default: as sampled)."""
        layout = layout or LossRows(self.prompts, self.completions, [0] * len(self), [0] * len(self))
        return Rows(rows=list(rows), prompts=[layout.prompts[i] for i in rows],
                    completions=[layout.completions[i] for i in rows], images=self.images_of(rows),
                    rollout_logprobs=[self.rollout_logprobs[i] for i in rows],
                    hint_lens=[layout.hint_lens[i] for i in rows])


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
    prompt_texts: list = field(default_factory=list)  # per row: the decoded prompt (rewards and samples.jsonl)


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
