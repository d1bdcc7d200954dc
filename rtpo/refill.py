"""Refilling a step's batch after it is scored, for groups that carry no learning signal (all G rewards
equal: zero advantage). Both strategies are off by default and count what they sample (`rollouts`).

- Hint re-roll (curriculum.reroll_keep = k > 0; BREAD-style hints on demand within the step): a group
  whose G rows are all wrong and whose keep is below k has its hinted rows sampled again with
  floor(k * n) of its trace in the prompt; the new completions replace those rows. A hint that helps
  turns a signal-free group into a mixed one in the same step, whether or not the question recurs.
- Dynamic sampling (rollout.dynamic_sampling = R > 0; DAPO): up to R further rounds of prompts_per_step
  new prompts are sampled (and re-rolled) while fewer than prompts_per_step groups have varying rewards;
  the batch is the first prompts_per_step such groups in sampling order, topped up with the first
  round's other groups when R rounds do not find enough (so every update has the same shape).

With several processes the rounds are agreed from the gathered rewards, and the kept groups are dealt
out again in contiguous shares, so W processes train on exactly the groups one process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtpo.advantages import all_wrong, varied_groups
from rtpo.stages import Rollout, Scores


@dataclass
class Refill:
    """What the refill did this step (all processes): its metrics."""
    rollouts: int = 0            # completions sampled this step (first round included)
    rounds: int = 0              # dynamic sampling's extra rounds
    rerolled_groups: int = 0     # groups re-sampled with a hint

    def metrics(self) -> dict:
        return {"rollouts": float(self.rollouts), "refill_rounds": float(self.rounds),
                "rerolled_groups": float(self.rerolled_groups)}


def pick_groups(varied: list, B: int) -> list:
    """Indices of the batch's B groups among the candidates (in sampling order): the varied ones first-come,
    then, if fewer than B vary, the earliest others (kept in sampling order)."""
    good = [i for i, v in enumerate(varied) if v][:B]
    if len(good) < B:
        good += [i for i, v in enumerate(varied) if not v][:B - len(good)]
    return sorted(good)


class Refiller:
    """(Rollout, Scores) of a step -> the same with its signal-free groups re-rolled with a hint and/or
    replaced by dynamic sampling (unchanged when both are off)."""

    def __init__(self, run, sampler, scorer, comm):
        self.run, self.sampler, self.scorer, self.comm = run, sampler, scorer, comm
        self.reroll_keep = run.cfg.curriculum.reroll_keep
        self.rounds = run.cfg.rollout.dynamic_sampling

    def refill(self, ro: Rollout, sc: Scores) -> tuple[Rollout, Scores, Refill]:
        info = Refill(rollouts=len(sc.rewards))
        ro, sc = self.reroll(ro, sc, info)
        if not self.rounds:
            return ro, sc, info
        G, B = ro.G, self.run.cfg.rollout.prompts_per_step
        rounds = [(ro, sc)]
        while sum(int(varied_groups(s.rewards, G).sum()) for _, s in rounds) < B and info.rounds < self.rounds:
            info.rounds += 1
            r = self.sampler.rollout(ro.step, info.rounds)
            s = self.scorer.score(r)
            info.rollouts += len(s.rewards)
            rounds.append(self.reroll(r, s, info))
        self.sampler.extra_prompts += info.rounds * B  # the next step starts after every prompt taken here
        if info.rounds == 0:
            return ro, sc, info
        return (*self.regroup(rounds), info)

    def reroll(self, ro: Rollout, sc: Scores, info: Refill) -> tuple[Rollout, Scores]:
        """Hinted rows of the all-wrong groups whose keep < reroll_keep sampled again at reroll_keep; rescored."""
        k = self.reroll_keep
        if k <= 0 or not ro.hinted_rows:
            return ro, sc
        G, n = ro.G, len(ro.idx)
        # every process's groups, in rank order (the scores are gathered): each process's re-rolls are known here
        wrong = all_wrong(torch.tensor(sc.accuracy).view(-1, G)).tolist()
        todo = [w and keep < k for w, keep in zip(wrong, sc.group_keeps)]
        counts = [sum(todo[r * n:(r + 1) * n]) for r in range(self.comm.world)]
        mine = [g for g in range(n) if todo[self.comm.rank * n + g]]
        if not sum(counts):
            return ro, sc
        for g in mine:
            ro.keeps[g] = k
            ro.hinted[g] = self.run.builder.prompt(self.run.train_enc[ro.idx[g]], k)
        self.sampler.resample_hinted(ro, mine, counts)
        info.rerolled_groups += sum(counts)
        info.rollouts += sum(counts) * ro.hinted_rows
        return ro, self.scorer.score(ro)

    def regroup(self, rounds: list) -> tuple[Rollout, Scores]:
        """The batch's groups from all rounds (pick_groups), dealt out to the processes in contiguous shares."""
        G, B, comm = rounds[0][0].G, self.run.cfg.rollout.prompts_per_step, self.comm
        records, varied = [], []
        for ro, sc in rounds:  # every process's groups of each round, in rank order (= sampling order)
            lo = comm.rank * len(ro)
            mine = [_record(ro, sc, g, lo) for g in range(len(ro.idx))]
            records += [rec for part in comm.gather_objects(mine) for rec in part]
            varied += varied_groups(sc.rewards, G).tolist()
        chosen = [records[i] for i in pick_groups(varied, B)]
        local = comm.share(chosen)
        ro = self.sampler.assemble(rounds[0][0].step, [r.idx for r in local], [r.keep for r in local])
        for r in local:
            ro.completions += r.completions
            ro.finish_reasons += r.finish_reasons
            ro.rollout_logprobs += r.rollout_logprobs
        sc = Scores(rewards=torch.tensor([x for r in chosen for x in r.rewards], dtype=torch.float32),
                    per_fn={k: [x for r in chosen for x in r.per_fn[k]] for k in rounds[0][1].per_fn},
                    accuracy=[x for r in chosen for x in r.accuracy], texts=[x for r in local for x in r.texts],
                    group_idx=[r.idx for r in chosen], group_keeps=[r.keep for r in chosen],
                    prompt_texts=[x for r in local for x in r.prompt_texts])
        sc.advantages = self.scorer.advantages(sc.rewards, len(ro))
        return ro, sc


@dataclass
class GroupRecord:
    """One group of a rollout with its rows' scores: what another process needs to train on it."""
    idx: int
    keep: float
    completions: list
    finish_reasons: list
    rollout_logprobs: list
    rewards: list
    accuracy: list
    per_fn: dict
    texts: list
    prompt_texts: list


def _record(ro: Rollout, sc: Scores, g: int, lo: int) -> GroupRecord:
    """Group g of this process's rollout (`lo`: the process's first row in the gathered `sc`)."""
    G = ro.G
    rows, glob = slice(g * G, g * G + G), slice(lo + g * G, lo + g * G + G)
    return GroupRecord(idx=ro.idx[g], keep=ro.keeps[g], completions=ro.completions[rows],
                       finish_reasons=ro.finish_reasons[rows], rollout_logprobs=ro.rollout_logprobs[rows],
                       rewards=sc.rewards[glob].tolist(), accuracy=list(sc.accuracy[glob]),
                       per_fn={k: list(v[glob]) for k, v in sc.per_fn.items()}, texts=sc.texts[rows],
                       prompt_texts=sc.prompt_texts[rows])
