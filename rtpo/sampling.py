"""The sampling stage: a step's prompts, their completions, and the Rollout that holds them.

The step's prompts are a pure function of (seed, step) and the checkpointed curriculum state, so a
resumed run (and W processes, each taking its contiguous share) samples exactly what one process would.
"""

from __future__ import annotations

import numpy as np

from rtpo.curriculum import Curriculum, dropout_rows
from rtpo.generation import SamplingConfig, draw_uniforms, generate
from rtpo.prompts import response_ids
from rtpo.stages import Rollout, expand


def run_generate(run, prompts: list, sampling: SamplingConfig, num_samples: int, **generate_kw):
    """rtpo.generation.generate on the run's policy, in eval mode under the run's autocast."""
    c, model = run.cfg, run.model
    was_training = model.training
    model.eval()
    try:
        with run.autocast():
            return generate(model, prompts, sampling, num_samples=num_samples, tokenizer=run.tok,
                            share_prefix=c.rollout.share_prefix, cache=c.rollout.cache,
                            batch_size=c.rollout.batch_size or None, **generate_kw)
    finally:
        model.train(was_training)


def image_inputs(builder, encs: list) -> list | None:
    """Per example, its images as model inputs (None for a row without); None when no example has any,
    so that text-only runs take exactly the text path."""
    if not any(e.images for e in encs):
        return None
    return [builder.image_inputs(e) for e in encs]


class Sampler:
    """Samples each step's rollout: G completions of each of this process's prompts."""

    def __init__(self, run, backend, curriculum: Curriculum, generator):
        self.run, self.backend, self.comm = run, backend, backend.comm
        self.curriculum, self.gen = curriculum, generator  # both checkpointed (rtpo.saving)

    def batch_indices(self, step: int) -> list:
        """This process's contiguous share of the step's prompts (all of them in a one-process run)."""
        c = self.run.cfg
        n, B = len(self.run.train_rows), c.rollout.prompts_per_step
        out = []
        for p in range(step * B, step * B + B):
            epoch, i = divmod(p, n)
            perm = np.random.default_rng([c.run.seed, epoch]).permutation(n) if c.data.shuffle else np.arange(n)
            out.append(int(perm[i]))
        return self.comm.share(out)

    def step_prompts(self, step: int) -> tuple[list, list, list]:
        """(this process's example indices, their keeps, their hinted Prompts) at `step`: what `rollout`
        samples from (hint dropout aside)."""
        idx = self.batch_indices(step)
        keeps = self.curriculum.example_keeps(step, idx)
        return idx, keeps, [self.run.builder.prompt(self.run.train_enc[i], k) for i, k in zip(idx, keeps)]

    def generate(self, prompts: list, sampling: SamplingConfig, num_samples: int, **generate_kw):
        """Completions drawn from the run's generator. Every process draws the step's whole uniform table, as
        one process would, and samples its columns: its completions are the ones one process would sample
        for these rows, and the generator stays in step."""
        generator = self.gen
        if self.comm.world > 1:
            rows, r = len(prompts) * num_samples, self.comm.rank
            table = draw_uniforms(sampling, rows * self.comm.world, generator)
            if table is not None:
                generate_kw["uniforms"] = table[:, r * rows:(r + 1) * rows]
            generator = None
        return run_generate(self.run, prompts, sampling, num_samples, generator=generator, **generate_kw)

    def rollout(self, step: int) -> Rollout:
        """G completions for each of the step's prompts. Each example's prompt holds its kept hint
        (the schedule's keep, or its own with curriculum.per_example); with hint_dropout the first
        dropout_rows(G) rows of every group get the hint-free prompt instead. Row r belongs to group r // G."""
        run, c, G = self.run, self.run.cfg, self.run.cfg.rollout.num_generations
        keep = self.curriculum.keep(step)
        idx, keeps, hinted = self.step_prompts(step)
        encs = [run.train_enc[i] for i in idx]
        plain = [run.builder.prompt(e, 0.0) for e in encs]
        images = image_inputs(run.builder, encs)  # each group's images, processed once for the rollout and the update
        n0 = dropout_rows(G, c.curriculum.hint_dropout)
        sampling = SamplingConfig(max_new_tokens=c.rollout.max_new_tokens, temperature=c.rollout.temperature,
                                  top_k=c.rollout.top_k, top_p=c.rollout.top_p, eos_token_ids=run.eos_ids,
                                  stop_strings=tuple(c.rollout.stop_strings), pad_token_id=run.tok.pad_token_id)
        # one generate call per prompt variant, so each variant's prompt is still prefilled once per group
        tis = c.loss.tis_cap > 0  # truncated importance sampling needs the sampler's own log-probs
        with self.backend.generation():
            outs = [self.generate([p.ids for p in variant], sampling, n, return_logprobs=tis, images=images)
                    if n else None for variant, n in ((plain, n0), (hinted, G - n0))]
        ro = Rollout(step=step, keep=keep, G=G, idx=idx, keeps=keeps,
                     examples=[run.train_rows[i] for i in idx], hinted=hinted, plain=plain, hinted_rows=G - n0,
                     images=None if images is None else expand(images, G))
        if c.loss.sft_loss > 0:  # per group: (hint-free prompt, whole response) for the SFT loss
            ro.sft_targets = [(list(e.base), response_ids(run.builder, run.train_rows[i], e, run.tok.eos_token_id))
                              for i, e in zip(idx, encs)]
        for g in range(len(idx)):  # each variant's output holds its groups' rows consecutively
            for out, n, j0 in ((outs[0], n0, 0), (outs[1], G - n0, n0)):
                for r in range(g * n, g * n + n) if n else ():
                    ro.completions.append(out.completions[r])
                    ro.rollout_logprobs.append(out.logprobs[r] if out.logprobs is not None else None)
                    ro.finish_reasons.append(out.finish_reasons[r])
        return ro
