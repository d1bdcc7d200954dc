"""The sampling stage: a step's prompts, their completions, and the Rollout that holds them.

The step's prompts are a pure function of (seed, step) and the checkpointed curriculum state and data
cursor (`extra_prompts`, moved only by dynamic sampling), so a resumed run (and W processes, each taking
its contiguous share) samples exactly what one process would.
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
        # prompts taken by rollout.dynamic_sampling's extra rounds before this step (checkpointed): the
        # step's own prompts start after them
        self.extra_prompts = 0

    def batch_indices(self, step: int, round: int = 0) -> list:
        """This process's contiguous share of the step's prompts (all of them in a one-process run): data
        positions step*B + extra_prompts + round*B onwards, B = prompts_per_step (`round` > 0: dynamic sampling)."""
        c = self.run.cfg
        n, B = len(self.run.train_rows), c.rollout.prompts_per_step
        start = step * B + self.extra_prompts + round * B
        out = []
        for p in range(start, start + B):
            epoch, i = divmod(p, n)
            perm = np.random.default_rng([c.run.seed, epoch]).permutation(n) if c.data.shuffle else np.arange(n)
            out.append(int(perm[i]))
        return self.comm.share(out)

    def step_prompts(self, step: int) -> tuple[list, list, list]:
        """(this process's example indices, their keeps, their hinted Prompts) at `step`: what `rollout`
        samples from (hint dropout aside)."""
        ro = self.unsampled(step)
        return ro.idx, ro.keeps, ro.hinted

    def unsampled(self, step: int, round: int = 0) -> Rollout:
        """The Rollout of the step's prompts (`round` > 0: dynamic sampling's further prompts) at their keeps,
        before any completion is sampled."""
        idx = self.batch_indices(step, round)
        return self.assemble(step, idx, self.curriculum.example_keeps(step, idx))

    @property
    def sampling(self) -> SamplingConfig:
        run, c = self.run, self.run.cfg
        return SamplingConfig(max_new_tokens=c.rollout.max_new_tokens, temperature=c.rollout.temperature,
                              top_k=c.rollout.top_k, top_p=c.rollout.top_p, eos_token_ids=run.eos_ids,
                              stop_strings=tuple(c.rollout.stop_strings), pad_token_id=run.tok.pad_token_id)

    def generate(self, prompts: list, sampling: SamplingConfig, num_samples: int, counts: list | None = None,
                 **generate_kw):
        """Completions drawn from the run's generator (None for no prompts). Every process draws the uniform
        table of all processes' rows, as one process would, and samples its own columns: its completions are
        the ones one process would sample for these rows, and the generator stays in step. `counts`: every
        process's number of prompts, when they differ (default: all as many as this one)."""
        generator = self.gen
        if self.comm.world > 1:
            counts = counts or [len(prompts)] * self.comm.world
            rows, before = len(prompts) * num_samples, sum(counts[:self.comm.rank]) * num_samples
            table = draw_uniforms(sampling, sum(counts) * num_samples, generator)
            if table is not None:
                generate_kw["uniforms"] = table[:, before:before + rows]
            generator = None
        if not prompts:
            return None
        return run_generate(self.run, prompts, sampling, num_samples, generator=generator, **generate_kw)

    def assemble(self, step: int, idx: list, keeps: list) -> Rollout:
        """The Rollout of examples `idx` at their `keeps`, before any completion is sampled."""
        run, c, G = self.run, self.run.cfg, self.run.cfg.rollout.num_generations
        encs = [run.train_enc[i] for i in idx]
        images = image_inputs(run.builder, encs)  # each group's images, processed once for the rollout and the update
        ro = Rollout(step=step, keep=self.curriculum.keep(step), G=G, idx=list(idx), keeps=list(keeps),
                     examples=[run.train_rows[i] for i in idx],
                     hinted=[run.builder.prompt(e, k) for e, k in zip(encs, keeps)],
                     plain=[run.builder.prompt(e, 0.0) for e in encs],
                     hinted_rows=G - dropout_rows(G, c.curriculum.hint_dropout),
                     images=None if images is None else expand(images, G))
        if c.loss.sft_loss > 0:  # per group: (hint-free prompt, whole response) for the SFT loss
            ro.sft_targets = [(list(e.base), response_ids(run.builder, run.train_rows[i], e, run.tok.eos_token_id))
                              for i, e in zip(idx, encs)]
        return ro

    def rollout(self, step: int, round: int = 0) -> Rollout:
        """G completions for each of the step's prompts (`round` > 0: dynamic sampling's further prompts).
        Each example's prompt holds its kept hint (the schedule's keep, or its own with curriculum.per_example);
        with hint_dropout the first dropout_rows(G) rows of every group get the hint-free prompt instead.
        Row r belongs to group r // G."""
        ro = self.unsampled(step, round)
        G, h = ro.G, ro.hinted_rows
        # one generate call per prompt variant, so each variant's prompt is still prefilled once per group
        outs = self._sample([(ro.plain, G - h), (ro.hinted, h)], ro)
        for g in range(len(ro.idx)):  # each variant's output holds its groups' rows consecutively
            for out, n in zip(outs, (G - h, h)):
                for r in range(g * n, g * n + n) if n else ():
                    ro.completions.append(out.completions[r])
                    ro.rollout_logprobs.append(out.logprobs[r] if out.logprobs is not None else None)
                    ro.finish_reasons.append(out.finish_reasons[r])
        return ro

    def resample_hinted(self, ro: Rollout, groups: list, counts: list | None = None) -> None:
        """Sample the hinted rows of groups `groups` of `ro` again (from their current `hinted` prompts), in
        place. `counts`: every process's number of such groups (all processes call this together)."""
        if not ro.hinted_rows:
            return
        G, h = ro.G, ro.hinted_rows
        out, = self._sample([([ro.hinted[g] for g in groups], h)], ro, counts=counts, groups=groups)
        for j, g in enumerate(groups):
            for k in range(h):
                r, o = g * G + G - h + k, j * h + k
                ro.completions[r] = out.completions[o]
                ro.rollout_logprobs[r] = out.logprobs[o] if out.logprobs is not None else None
                ro.finish_reasons[r] = out.finish_reasons[o]

    def _sample(self, variants: list, ro: Rollout, counts=None, groups=None) -> list:
        """One generate call per (prompts, samples per prompt) variant, inside the backend's generation context."""
        tis = self.run.cfg.loss.tis_cap > 0  # truncated importance sampling needs the sampler's own log-probs
        G = ro.G
        images = None if ro.images is None else [ro.images[g * G] for g in (groups if groups is not None
                                                                            else range(len(ro.idx)))]
        with self.backend.generation():
            return [self.generate([p.ids for p in prompts], self.sampling, n, counts=counts, return_logprobs=tis,
                                  images=images) if n else None for prompts, n in variants]
