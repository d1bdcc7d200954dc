"""The evaluation stage: greedy completions of held-out rows at a hint fraction, scored as in training.

Used by the training loop (no hint, rows sharded over processes) and by `rtpo.eval` (any keep, one
process), on a `rtpo.run.Run`: no trainer and no optimizer needed.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from rtpo.generation import SamplingConfig
from rtpo.rewards import RewardError, accuracy_reward, format_reward, score
from rtpo.sampling import image_inputs, run_generate
from rtpo.scoring import reward_kwargs
from rtpo.stages import TrainingError


def reasoning_length(ids: list, close_ids: list) -> int:
    """Tokens generated before the reasoning is closed (all of them if it never is)."""
    n = len(close_ids)
    for i in range(len(ids) - n + 1):
        if ids[i:i + n] == close_ids:
            return i
    return len(ids)


class Evaluation:
    """Greedy evaluation of a run's policy. `backend`: its generation phase is held around the training
    loop's evaluations (ZeRO-3 gathers the parameters once); None for one process."""

    def __init__(self, run, comm, backend=None):
        self.run, self.comm, self.backend = run, comm, backend

    def greedy_completions(self, prompts: list, progress=None, encs=None) -> tuple:
        """Greedy completions (eval settings, in eval.batch_size chunks) -> (token lists, finish reasons).
        `progress(n)`, if given, is called after each chunk with its number of rows. `encs`: the prompts'
        encoded examples, whose images (if any) go with them."""
        run, e = self.run, self.run.cfg.eval
        sampling = SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=0.0, eos_token_ids=run.eos_ids,
                                  stop_strings=tuple(run.cfg.rollout.stop_strings), pad_token_id=run.tok.pad_token_id)
        comps, reasons = [], []
        for i in range(0, len(prompts), e.batch_size):
            images = image_inputs(run.builder, encs[i:i + e.batch_size]) if encs is not None else None
            out = run_generate(run, prompts[i:i + e.batch_size], sampling, 1, generator=None, images=images)
            comps += out.completions
            reasons += out.finish_reasons
            if progress is not None:
                progress(len(out.completions))
        return comps, reasons

    @torch.no_grad()
    def evaluate_at(self, keep: float, encs: list, rows: list, progress=None, step: int = 0) -> tuple:
        """Greedy completions of `rows` (encoded as `encs`) prompted with their traces cut at `keep`
        (0: the evaluation prompt, no hint), scored as in training -> (metrics, one record per row).
        metrics: accuracy, format, reasoning_tokens and completion_tokens (generated tokens),
        injected_tokens, and reward/<name> for every configured reward function."""
        if not encs:
            return {}, []
        run = self.run
        built = [run.builder.prompt(enc, keep) for enc in encs]
        prompts = [p.ids for p in built]
        comps, reasons = self.greedy_completions(prompts, progress=progress, encs=encs)
        texts = [run.decode(x) for x in comps]
        answers = [r.answer for r in rows]
        kw = reward_kwargs(run, rows, prompts, comps, texts, [p.prefix for p in built], reasons, [keep] * len(rows),
                           run.cfg.eval.max_new_tokens, step)
        acc = accuracy_reward(texts, answers, **kw)
        fmt = format_reward(texts, answers, **kw)
        try:
            _, per_fn = score(run.reward_fns, texts, answers, **kw)
        except RewardError as e:
            raise TrainingError(f"evaluation at step {step}: {e}") from None
        metrics = {"accuracy": float(np.mean(acc)), "format": float(np.mean(fmt)),
                   "reasoning_tokens": float(np.mean([reasoning_length(x, run.close_ids) for x in comps])),
                   "completion_tokens": float(np.mean([len(x) for x in comps])),
                   "injected_tokens": float(np.mean([p.injected for p in built]))}
        metrics.update({f"reward/{k}": float(np.mean(v)) for k, v in per_fn.items()})
        records = [{"prompt": kw["prompts"][i], "keep": float(keep), "injected_tokens": built[i].injected,
                    "completion": texts[i], "answer": answers[i], "correct": bool(acc[i]),
                    "rewards": {k: v[i] for k, v in per_fn.items()}, "finish_reason": reasons[i],
                    "completion_tokens": len(comps[i]), "example": rows[i].index} for i in range(len(rows))]
        return metrics, records

    def evaluate(self, step: int) -> tuple[dict, list]:
        """Greedy, NO hint (the prompts a user would send), on the held-out rows -> (eval/ metrics over all
        processes, this process's first log.sample_eval_rows records for samples.jsonl)."""
        run, e = self.run, self.run.cfg.eval
        encs, rows = run.eval_enc[: e.num_examples], run.eval_rows[: e.num_examples]
        lo, hi = self.comm.bounds(len(encs))  # sharded over processes, means combined by example counts
        metrics, records = {}, []
        if hi > lo:
            with self.backend.generation() if self.backend is not None else contextlib.nullcontext():
                metrics, records = self.evaluate_at(0.0, encs[lo:hi], rows[lo:hi], step=step)
        metrics = {f"eval/{k}": v for k, v in metrics.items() if k != "injected_tokens"}
        return self.comm.weighted_mean(hi - lo, metrics), records[: run.cfg.log.sample_eval_rows]
