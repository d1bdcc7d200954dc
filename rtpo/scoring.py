"""The scoring stage: rewards of a rollout's rows, gathered over processes, and group advantages,
computed in this one place (so scale_rewards = batch uses every process's rewards)."""

from __future__ import annotations

import torch

from rtpo.advantages import group_advantages
from rtpo.rewards import RewardError, accuracy_reward, score
from rtpo.stages import Rollout, Scores, TrainingError, expand


def reward_kwargs(run, rows, prompts, completion_ids, texts, prefixes, finish_reasons, keeps, max_new_tokens,
                  step: int) -> dict:
    """The keyword arguments of every reward call (the signature is in rtpo/rewards.py), one entry per
    completion: `rows` are the Examples the completions answer, `prompts` their prompt token ids."""
    decoded, prompt_texts = {}, []
    for p in prompts:  # the G rows of a group share one prompt list: decode it once
        if id(p) not in decoded:
            decoded[id(p)] = run.tok.decode(p, skip_special_tokens=False)
        prompt_texts.append(decoded[id(p)])
    cc = run.cfg.curriculum
    kw = {name: [ex.columns.get(name) for ex in rows] for name in run.column_names}
    kw.update(prompts=prompt_texts, completion_ids=[list(c) for c in completion_ids],
              responses=[p + t for p, t in zip(prefixes, texts)], questions=[ex.question for ex in rows],
              finish_reasons=list(finish_reasons), completion_lengths=[len(c) for c in completion_ids],
              keeps=[float(k) for k in keeps], max_new_tokens=max_new_tokens, think_open=cc.think_open,
              think_close=cc.think_close, step=step)
    return kw


class Scorer:
    """Rollout -> Scores: rewards, accuracy, and this process's rows' group advantages."""

    def __init__(self, run, comm):
        self.run, self.comm = run, comm

    def score(self, ro: Rollout) -> Scores:
        """Rewards of this process's rows, gathered over processes, then group advantages on the whole
        batch; this process keeps its own rows'."""
        run, G = self.run, self.run.cfg.rollout.num_generations
        texts = [run.decode(c) for c in ro.completions]
        ctx = reward_kwargs(run, expand(ro.examples, G), ro.prompts, ro.completions, texts,
                            [p.prefix for p in ro.row_prompts], ro.finish_reasons, ro.row_keep,
                            run.cfg.rollout.max_new_tokens, ro.step)
        answers = ro.answers
        try:
            total, per_fn = score(run.reward_fns, texts, answers, **ctx)
        except RewardError as e:
            raise TrainingError(f"step {ro.step}: {e}. Fix it, then continue from the last checkpoint with "
                                "--resume auto") from None
        acc = per_fn.get("accuracy") or accuracy_reward(texts, answers, **ctx)
        sc = self.gather(Scores(rewards=torch.tensor(total, dtype=torch.float32), per_fn=per_fn, accuracy=acc,
                                texts=texts, group_idx=list(ro.idx), group_keeps=list(ro.keeps),
                                prompt_texts=ctx["prompts"]))
        sc.advantages = self.advantages(sc.rewards, len(ro))
        return sc

    def advantages(self, rewards: torch.Tensor, n: int) -> torch.Tensor:
        """Group advantages of all processes' rows (`rewards`, in rank order) -> this process's n rows'."""
        c = self.run.cfg
        adv = group_advantages(rewards, c.rollout.num_generations, c.loss.scale_rewards, c.loss.adv_eps)
        return adv[self.comm.rank * n:self.comm.rank * n + n]

    def gather(self, sc: Scores) -> Scores:
        """`sc` with every process's rows (in rank order) and groups; texts stay this process's."""
        if self.comm.world == 1:
            return sc
        names = sorted(sc.per_fn)
        local = torch.stack([sc.rewards.double(), torch.tensor(sc.accuracy, dtype=torch.float64)]
                            + [torch.tensor(sc.per_fn[k], dtype=torch.float64) for k in names], dim=1)
        full = self.comm.gather_rows(local)
        groups = self.comm.gather_objects((sc.group_idx, sc.group_keeps))  # per-example hints see every group
        return Scores(rewards=full[:, 0].float(), accuracy=full[:, 1].tolist(), texts=sc.texts,
                      per_fn={k: full[:, 2 + i].tolist() for i, k in enumerate(names)},
                      group_idx=[i for g, _ in groups for i in g], group_keeps=[k for _, ks in groups for k in ks],
                      prompt_texts=sc.prompt_texts)
