"""The training loop: a conductor of stage components. The math lives in curriculum / advantages /
losses / rewards; each stage in its own module.

One training step:
    Sampler.rollout (rtpo/sampling.py: prompts cut at keep(step) -> G completions each) -> Rollout
    -> Scorer.score (rtpo/scoring.py: rewards -> gathered -> group advantages) -> Scores
    -> Refiller.refill (rtpo/refill.py: all-wrong groups re-rolled with a hint, zero-variance groups replaced
       by new prompts; both off by default) -> Rollout, Scores
    -> Updater.update (rtpo/update.py: old / reference log-probs, then num_iterations x mini_batches
       optimizer updates, each accumulating over micro batches) -> update metrics.
The run it trains (`rtpo.run.setup`) is built once; Evaluation (rtpo/evaluation.py) and Checkpointer
(rtpo/saving.py) are held beside the stages.
"""

from __future__ import annotations

import math
import os
import signal
import time

import numpy as np
import torch

from rtpo import checkpoint as ckpt, lora, runlock
from rtpo.advantages import group_outcomes, zero_variance_fraction
from rtpo.backends import Backend, LocalBackend, make_backend
from rtpo.config import ConfigError, RTPOConfig, save as save_config
from rtpo.curriculum import Curriculum
from rtpo.evaluation import Evaluation, reasoning_length
from rtpo.metrics import (MetricsLog, NoLog, Samples, before_after_table, make_reporter, plot_metrics, reduce_as,
                          reduce_rows)
from rtpo.refill import Refiller
from rtpo.run import setup
from rtpo.sampling import Sampler
from rtpo.saving import Checkpointer
from rtpo.scoring import Scorer
from rtpo.stages import TrainingError
from rtpo.update import Updater

__all__ = ["Trainer", "TrainingError", "ForcedQuit", "make_trainer", "lr_lambda"]


class ForcedQuit(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: quit at once without saving (a KeyboardInterrupt, so no `except Exception` holds it)."""


def lr_lambda(kind: str, warmup: int, total: int):
    def f(s):
        if s < warmup:
            return (s + 1) / warmup
        r = min((s - warmup) / max(total - warmup, 1), 1.0)
        return {"constant": 1.0, "linear": 1.0 - r, "cosine": 0.5 * (1 + math.cos(math.pi * r))}[kind]
    return f


# computed from the gathered rewards (or the same on every process): already global
reduce_as("same", "step", "keep", "lr", "reward", "reward_std", "accuracy", "zero_var_groups", "all_wrong_groups",
          "all_right_groups", "mean_example_keep", "rollouts", "refill_rounds", "rerolled_groups")


class Trainer:
    """Holds the run and its stages, and runs the loop. Its own state: the step, the skip counters and the
    first signal received; the curriculum and the sampling generator are the sampler's, checkpointed here."""

    def __init__(self, cfg: RTPOConfig, log=None, backend: Backend | None = None):
        self.cfg, self.backend = cfg, backend or LocalBackend(cfg)  # the parallel strategy: rtpo/backends/
        self.comm, self.out = self.backend.comm, cfg.run.output_dir
        # the main process alone reports and writes the run folder
        self.log = (log or (lambda msg: print(msg, flush=True))) if self.comm.is_main else (lambda msg: None)
        with self.backend.main_first():  # local rank 0 loads first (downloads, caches), the others then hit the caches
            self.run = run = setup(cfg, self.backend, self.log)
        trainable, total = lora.param_counts(run.model)
        self.log(f"[rtpo] {lora.describe(cfg.model.lora, run.model)}" if run.peft is not None
                 else f"[rtpo] full fine-tuning: {trainable:,} trainable of {total:,} parameters")
        self.updater = Updater(run, self.backend, self.log)
        o = cfg.optim
        self.backend.prepare(run.model, run.ref, lr_lambda(o.lr_schedule, o.lr_warmup_steps,
                                                           cfg.run.max_steps * self.updater.updates_per_step))
        self.sampler = Sampler(run, self.backend, Curriculum(cfg.curriculum, cfg.run.max_steps),
                               torch.Generator().manual_seed(cfg.run.seed))
        self.scorer, self.evaluation = Scorer(run, self.comm), Evaluation(run, self.comm, self.backend)
        self.refiller = Refiller(run, self.sampler, self.scorer, self.comm)
        self.checkpointer, self.samples = Checkpointer(run, self.backend, self.log), Samples(cfg.log.sample_groups)
        self.step = self.consecutive_skips = self.skipped_total = 0
        self._stop_signal = self._signalled = None  # why the loop stops; the first SIGINT/SIGTERM received
        if run.resume_from:
            self.load_state_dict(self.checkpointer.load(run.resume_from))
        if self.backend.description:
            self.log(f"[rtpo] {self.backend.description}: {self.comm.world} process(es), "
                     f"{cfg.rollout.prompts_per_step // self.comm.world} prompts x {cfg.rollout.num_generations} "
                     f"completions each per step, {self.backend.gas} micro batch(es) per update")

    # --- checkpoints: the loop's own state (rtpo/saving.py adds the backend's, the RNG and the config) ----
    def state_dict(self) -> dict:
        return {"step": self.step, "curriculum": self.sampler.curriculum.state_dict(),
                "generator": self.sampler.gen.get_state(), "consecutive_skips": self.consecutive_skips,
                "skipped_total": self.skipped_total, "extra_prompts": self.sampler.extra_prompts}

    def load_state_dict(self, st: dict) -> None:
        self.step, self.consecutive_skips, self.skipped_total = st["step"], st["consecutive_skips"], st["skipped_total"]
        self.sampler.curriculum.load_state_dict(st["curriculum"])
        self.sampler.gen.set_state(st["generator"])
        self.sampler.extra_prompts = int(st.get("extra_prompts", 0))  # absent in checkpoints from before dynamic sampling

    def save(self) -> str:
        """The checkpoint of this step (its path, on every process once it is in place)."""
        return self.checkpointer.save(self.step, self.state_dict())

    # --- one step ----------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        """Sample, score, update -> the step's metrics row (over all processes)."""
        t0 = time.perf_counter()
        ro = self.sampler.rollout(step)
        t1 = time.perf_counter()
        sc = self.scorer.score(ro)
        ro, sc, refill = self.refiller.refill(ro, sc)  # hint re-roll, dynamic sampling (both off by default)
        self.samples.observe(ro, sc)
        t2 = time.perf_counter()
        up = self.updater.update(ro, sc)
        G = self.cfg.rollout.num_generations
        acc = float(np.mean(sc.accuracy))
        self.sampler.curriculum.observe(step, acc)
        per_group = torch.tensor(sc.accuracy, dtype=torch.float32).view(-1, G)
        # an example's own keep follows the rows that carried its hint (all rows if dropout took them all)
        hinted = per_group[:, G - ro.hinted_rows:] if ro.hinted_rows else per_group
        self.sampler.curriculum.observe_examples(sc.group_idx, sc.group_keeps, hinted.mean(1).tolist())
        all_wrong, all_right = group_outcomes(per_group)
        row = {
            "step": step, "keep": ro.keep, "injected_tokens": float(np.mean(ro.injected)),
            "mean_example_keep": float(np.mean(sc.group_keeps)),
            "completion_tokens": float(np.mean([len(x) for x in ro.completions])),
            "reasoning_tokens": float(np.mean([reasoning_length(x, self.run.close_ids) for x in ro.completions])),
            "reward": float(sc.rewards.mean()), "reward_std": float(sc.rewards.std()),
            "accuracy": acc, "zero_var_groups": zero_variance_fraction(sc.rewards, G),
            "all_wrong_groups": all_wrong, "all_right_groups": all_right,
            "truncated_completions": float(np.mean([r == "length" for r in ro.finish_reasons])),
        }
        for name, vals in sc.per_fn.items():
            row[f"reward/{name}"] = float(np.mean(vals))
            row[f"reward_std/{name}"] = float(np.std(vals))
        row.update(refill.metrics())
        row.update(up)
        row["lr"] = self.backend.lr()
        row.update({"time_rollout": t1 - t0, "time_scoring": t2 - t1, "time_step": time.perf_counter() - t0})
        if self.comm.world == 1:
            return row
        parts = self.comm.gather_objects((row, self._signalled))
        # A signal reaches the processes at slightly different moments; all stop at the same step.
        sig = next((s for _, s in parts if s), None)
        if sig and not self._stop_signal:
            self._stop_signal = sig
        return reduce_rows([r for r, _ in parts])

    def evaluate(self) -> dict:
        """Greedy, NO hint, on the held-out rows -> eval/ metrics (its records go to samples.jsonl)."""
        metrics, records = self.evaluation.evaluate(self.step)
        self.samples.observe_eval(records)
        return metrics

    # --- the loop ----------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self._signalled:  # a second signal: the user does not want to wait for the step to end
            raise ForcedQuit(f"{name} received twice: quit without saving; the checkpoints in {self.out} are as "
                             "they were: continue with --resume auto")
        self._signalled = name
        if self.comm.world == 1:  # otherwise train_step stops every process at the same step
            self._stop_signal = name
        # os.write, not print: a handler that prints while the interrupted code prints raises
        os.write(2, f"[rtpo] {name}: stopping after this step with a checkpoint; send {name} again to quit at "
                    "once without saving\n".encode())

    def train(self) -> dict:
        """Train to run.max_steps (or a stop), holding the run folder's lock throughout (rtpo/runlock.py)."""
        main = self.comm.is_main  # the main process alone writes the run folder and holds its lock
        if main:
            os.makedirs(self.out, exist_ok=True)
        lock = runlock.acquire(self.out, log=self.log) if main else None
        try:
            if main and self.run.resume_from is None:  # a fresh run over an old one (--run.overwrite): drop its checkpoints
                ckpt.remove_checkpoints(self.out)
            return self._train()
        finally:
            if lock:
                lock.release()

    def _train(self) -> dict:
        from tqdm.auto import tqdm

        c, main = self.cfg, self.comm.is_main
        resume_step = self.step if self.run.resume_from else None
        if main:
            save_config(c, os.path.join(self.out, "config.json"))
        metrics = MetricsLog(os.path.join(self.out, "metrics.jsonl"), resume_step) if main else NoLog()
        samples = MetricsLog(os.path.join(self.out, "samples.jsonl"), resume_step) if main else NoLog()
        reporter = make_reporter(c.log.report_to if main else "none", self.out, project=c.log.project,
                                 config=c.to_dict(), resume_step=resume_step)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        t_start, start, first_eval, last_eval = time.perf_counter(), self.step, None, None
        bar = tqdm(total=c.run.max_steps, initial=self.step, disable=not (c.log.progress and main), dynamic_ncols=True,
                   desc="rtpo")
        try:
            while self.step < c.run.max_steps:
                row, every = {}, self.step == 0 or (c.eval.every and self.step % c.eval.every == 0)
                if c.eval.num_examples and every:
                    row.update(self.evaluate())
                    first_eval = first_eval or row
                row.update(self.train_step(self.step))
                metrics.write(row)
                reporter.log(row, self.step)
                if every:
                    samples.write_many(self.samples.take(self.step))
                bar.update(1)
                bar.set_postfix(**_postfix(row), refresh=False)
                self.step += 1
                self._track_skips(row)
                if c.run.stop_after_steps and self.step - start == c.run.stop_after_steps and self.step < c.run.max_steps:
                    self._stop_signal = "stop_after_steps"
                if self._stop_signal:
                    path = self.save()
                    self.log(f"[rtpo] {self._stop_signal}: saved {path} at step {self.step}; "
                             f"continue with --resume {self.out}")
                    return {"stopped": self._stop_signal, "checkpoint": path, "steps": self.step}
                if c.checkpoint.every and self.step % c.checkpoint.every == 0 and self.step < c.run.max_steps:
                    self.save()
            bar.close()
            final = {"step": self.step}
            if c.eval.num_examples:
                final.update(self.evaluate())
                metrics.write(final)
                reporter.log(final, self.step)
                samples.write_many(self.samples.take(self.step, train=False))
                last_eval = final
            path = self.save()
        finally:
            bar.close()
            reporter.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        return self._summary(path, start, time.perf_counter() - t_start, first_eval, last_eval)

    def _summary(self, path: str, start: int, seconds: float, first_eval, last_eval) -> dict:
        """summary.json (written by the main process), the plot, and the before/after table."""
        c, run = self.cfg, self.run
        summary = {"steps": self.step, "checkpoint": path, "wall_seconds": seconds,
                   "eval_before": {k: v for k, v in (first_eval or {}).items() if k.startswith("eval/")},
                   "eval_after": {k: v for k, v in (last_eval or {}).items() if k.startswith("eval/")},
                   "skipped_updates": self.skipped_total, "sft_tokens": run.sft_tokens,
                   "truncated_traces": dict(run.truncated),
                   "dropped_rows": dict(run.dropped)}
        if c.log.plot and self.comm.is_main:
            png = plot_metrics(os.path.join(self.out, "metrics.jsonl"), os.path.join(self.out, "curves.png"))
            self.log(f"[rtpo] plot: {png}" if png else "[rtpo] matplotlib not installed: no plot "
                     "(pip install 'rtpo[plot]')")
        if self.comm.is_main:
            ckpt.write_json(os.path.join(self.out, "summary.json"), summary)  # atomic: a kill leaves the old file or the new
        if summary["eval_before"] and summary["eval_after"]:
            self.log(before_after_table(summary["eval_before"], summary["eval_after"],
                                        f"[rtpo] held-out, no hint ({min(c.eval.num_examples, len(run.eval_enc))} "
                                        f"rows, greedy), step {start} -> {self.step}:"))
        return summary

    def _track_skips(self, row):
        skipped = row.get("skipped_updates", 0)
        self.skipped_total += skipped
        self.consecutive_skips = self.consecutive_skips + 1 if skipped == self.updater.updates_per_step else 0
        if self.consecutive_skips >= self.cfg.run.max_consecutive_skips:
            path = self.save()  # weights are those of the last good update: skipped steps changed nothing
            raise TrainingError(f"{self.consecutive_skips} consecutive steps had non-finite loss or gradients "
                                f"(step {row['step']}); last good state saved at {path}. Check rewards for NaN, "
                                "lower --optim.lr, or raise --run.max_consecutive_skips")


def _postfix(row: dict) -> dict:
    """The progress bar's summary of a step."""
    return dict(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.2f}", keep=f"{row['keep']:.2f}",
                wrong=f"{row['all_wrong_groups']:.2f}", right=f"{row['all_right_groups']:.2f}",
                len=f"{row['completion_tokens']:.0f}")


def make_trainer(cfg: RTPOConfig, log=None) -> Trainer:
    """A Trainer with the backend that run.deepspeed and the launcher ask for (rtpo.backends.make_backend)."""
    if cfg.run.resume and not cfg.run.deepspeed:
        try:
            path = ckpt.resolve_resume(cfg.run.output_dir if cfg.run.resume == "auto" else cfg.run.resume, check=False)
        except ckpt.CheckpointError:
            path = None  # Trainer reports it (and verifies the checkpoint it picks)
        if path and os.path.isdir(os.path.join(path, ckpt.DS_DIR)):
            raise ConfigError(ckpt.deepspeed_checkpoint_message(path))
    return Trainer(cfg, log=log, backend=make_backend(cfg))
