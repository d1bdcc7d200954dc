"""The training loop. It orchestrates; the math lives in curriculum / advantages / losses / rewards.

One training step:
    prompts (curriculum cut at keep(step)) -> G completions each (rtpo.generation)
    -> rewards -> group advantages -> (old / reference log-probs)
    -> num_iterations x mini_batches optimizer updates, each accumulating over micro batches.
"""

from __future__ import annotations

import copy
import math
import os
import random
import signal
import time

import numpy as np
import torch

from rtpo import checkpoint as ckpt, lora, runlock
from rtpo.advantages import group_advantages, group_outcomes, zero_variance_fraction
from rtpo.config import ConfigError, RTPOConfig, save as save_config
from rtpo.curriculum import Curriculum, dropout_rows, sft_weight
from rtpo.prompts import PromptBuilder, PromptTooLong, response_ids
from rtpo.data import load_splits, warmstart_rows
from rtpo.generation import SamplingConfig, draw_uniforms, generate
from rtpo.logprobs import make_batch, row_tokens, split_by_tokens, split_even
from rtpo.losses import hint_nll, hint_token_mask, hint_tokens_kept, policy_loss
from rtpo.metrics import MetricsLog, NoLog, reduce_as, reduce_rows, before_after_table, make_reporter, plot_metrics, report_to_problem
from rtpo.models import load_model_and_tokenizer, load_pretrained, load_tokenizer, load_vision_processor
from rtpo.backends import Backend, LocalBackend, make_backend
from rtpo.stages import LossRows, Rollout, Scores, Supervised, expand
from rtpo.vision import vision_encoder_parameters
from rtpo.rewards import (RESERVED, RewardError, accuracy_reward, build_reward_functions, format_reward,
                          missing_arguments, score)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite updates); a checkpoint of the last good state was saved."""


class ForcedQuit(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: quit at once without saving (a KeyboardInterrupt, so no `except Exception` holds it)."""


def reasoning_length(ids: list, close_ids: list) -> int:
    """Tokens generated before the reasoning is closed (all of them if it never is)."""
    n = len(close_ids)
    for i in range(len(ids) - n + 1):
        if ids[i:i + n] == close_ids:
            return i
    return len(ids)


def lr_lambda(kind: str, warmup: int, total: int):
    def f(s):
        if s < warmup:
            return (s + 1) / warmup
        r = min((s - warmup) / max(total - warmup, 1), 1.0)
        return {"constant": 1.0, "linear": 1.0 - r, "cosine": 0.5 * (1 + math.cos(math.pi * r))}[kind]
    return f


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device = {name!r} but CUDA is not available; use --run.device cpu")
    return torch.device(name)


reduce_as("sum", "loss", "hint_nll", "sft_nll", "fwd_tokens", "sup_tokens")  # each process holds its share of the global loss (hint NLL: global normaliser)
reduce_as("same", "grad_norm")  # the norm of the global gradient
reduce_as("max", "skipped_updates")
reduce_as("tokens", "clip_frac", "kl", "entropy", "tis_weight", "tis_truncated", "rollout_logp_gap")


class UpdateStats:
    """Sums of one step's updates -> its metrics (per-token means over the first pass's tokens)."""

    def __init__(self, time_old_logprobs: float, time_reference: float):
        self.t0, self.times = time.perf_counter(), {"time_old_logprobs": time_old_logprobs,
                                                    "time_reference": time_reference}
        self.sums = {k: 0.0 for k in ("tokens", "clipped_tokens", "kl_sum", "entropy_sum", "tis_weight_sum",
                                      "tis_truncated_tokens", "logp_gap_sum", "hint_nll", "sft_nll")}
        self.sums.update(hint_batches=0, sft_batches=0, loss=0.0, fwd_tokens=0, sup_tokens=0)
        self.grad_norms, self.skipped = [], 0

    def add_micro(self, st: dict) -> None:
        for k in ("tokens", "clipped_tokens", "kl_sum", "entropy_sum", "tis_weight_sum", "tis_truncated_tokens",
                  "logp_gap_sum", "hint_nll", "sft_nll"):
            if k in st:
                self.sums[k] += st[k].item() if torch.is_tensor(st[k]) else st[k]
        self.sums["hint_batches"] += "hint_nll" in st
        self.sums["sft_batches"] += "sft_nll" in st

    def add_tokens(self, forward: int, supervised: int) -> None:
        """Tokens through a forward + backward (every pass), and the supervised target tokens among them."""
        self.sums["fwd_tokens"] += forward
        self.sums["sup_tokens"] += supervised

    def add_update(self, loss: float, grad_norm: float) -> None:
        self.sums["loss"] += loss
        self.grad_norms.append(grad_norm)
        self.skipped += not (math.isfinite(loss) and math.isfinite(grad_norm))

    def metrics(self, updates: int, kl: bool, tis: bool) -> dict:
        s, tok = self.sums, max(self.sums["tokens"], 1)
        out = {"time_reference": self.times["time_reference"], "loss": s["loss"] / updates,
               "grad_norm": float(np.mean(self.grad_norms)), "clip_frac": s["clipped_tokens"] / tok,
               "kl": s["kl_sum"] / tok if kl else None, "entropy": s["entropy_sum"] / tok,
               "skipped_updates": self.skipped,
               "hint_nll": s["hint_nll"] / s["hint_batches"] if s["hint_batches"] else None,
               "sft_nll": s["sft_nll"] / s["sft_batches"] if s["sft_batches"] else None,
               "fwd_tokens": s["fwd_tokens"], "sup_tokens": s["sup_tokens"],
               "time_update": time.perf_counter() - self.t0, "time_old_logprobs": self.times["time_old_logprobs"]}
        if tis:  # per token: mean TIS weight, fraction truncated, mean |log pi_old - log pi_rollout|
            out.update(tis_weight=s["tis_weight_sum"] / tok, tis_truncated=s["tis_truncated_tokens"] / tok,
                       rollout_logp_gap=s["logp_gap_sum"] / tok)
        return out


class Trainer:
    def __init__(self, cfg: RTPOConfig, log=None, backend: Backend | None = None):
        self.cfg = cfg
        self.backend = backend or LocalBackend(cfg)  # the parallel strategy: rtpo/backends/
        self.comm = self.backend.comm
        self.out = cfg.run.output_dir
        self.log = log or (lambda msg: print(msg, flush=True))
        if not self.comm.is_main:  # the main process alone reports and writes the run folder
            self.log = lambda msg: None
            cfg.log.progress = cfg.log.plot = False
            cfg.log.report_to = "none"
        with self.backend.main_first():  # local rank 0 loads first (downloads, caches), the others then hit the caches
            self._setup()
        trainable, total = lora.param_counts(self.model)
        self.log(f"[rtpo] {lora.describe(cfg.model.lora, self.model)}" if self.peft is not None
                 else f"[rtpo] full fine-tuning: {trainable:,} trainable of {total:,} parameters")
        self.updates_per_step = cfg.loss.num_iterations * cfg.optim.mini_batches
        o = cfg.optim
        self.backend.prepare(self.model, self.ref, lr_lambda(o.lr_schedule, o.lr_warmup_steps,
                                                             cfg.run.max_steps * self.updates_per_step))
        self.curriculum = Curriculum(cfg.curriculum, cfg.run.max_steps)
        self.gen = torch.Generator().manual_seed(cfg.run.seed)
        self.step = 0
        self.consecutive_skips = 0
        self.skipped_total = 0
        self._stop_signal = None
        self._signalled = None  # the first SIGINT/SIGTERM received
        if self.resume_from:
            self._load_state(self.resume_from)
        if self.backend.describe():
            self.log(f"[rtpo] {self.backend.describe()}: {self.comm.world} process(es), "
                     f"{cfg.rollout.prompts_per_step // self.comm.world} prompts x {cfg.rollout.num_generations} "
                     f"completions each per step, {self.backend.gas} micro batch(es) per update")

    def _setup(self):
        """Data, model, tokenizer and reference model, checked against each other."""
        cfg = self.cfg
        self.resume_from = self._resolve_resume()
        try:
            self.reward_fns = build_reward_functions(cfg.rewards)
        except ValueError as e:
            raise ConfigError(f"rewards.custom: {e}") from None
        if report_to_problem(cfg.log.report_to):
            raise ConfigError(report_to_problem(cfg.log.report_to))
        self.device = pick_device(cfg.run.device)
        self.amp_dtype = self._amp_dtype()
        self._seed_everything(cfg.run.seed)

        self.train_rows, self.eval_rows = load_splits(cfg.data)
        self.column_names = self._reward_columns()
        self.model, self.tok = self._load_model()
        self.vision = self._load_vision()
        self._check_context()
        self._set_threads()
        self.builder = PromptBuilder(self.tok, cfg.curriculum, cfg.data.max_prompt_tokens, cfg.data.system_prompt,
                                     vision=self.vision)
        self.train_enc, self.train_rows = self._encode(self.train_rows, "train")
        self.eval_enc, self.eval_rows = self._encode(self.eval_rows, "eval")
        self._freeze_vision_encoder(self.model)
        if self.resume_from is None:
            self.model = self._freeze_vision_encoder(self._warmstarted(self.model))  # a cached copy is loaded unfrozen
        self.peft = self._attach_lora() if lora.enabled(cfg) else None  # self.model stays the (adapted) HF model
        self.model.to(self.device)
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            if self.peft is not None:  # frozen embeddings: checkpointed blocks need inputs that require grad
                self.model.enable_input_require_grads()
        self.sft_tokens = self._sft_first() if self.resume_from is None and cfg.sft.steps else 0
        self.ref = None
        if cfg.loss.beta > 0 and self.peft is not None:  # the base, i.e. the starting policy: adapters disabled
            self.ref = lora.AdaptersOff(self.peft)
        elif cfg.loss.beta > 0:  # a frozen copy of the STARTING policy, also when resuming
            start = self.model if self.resume_from is None else self._warmstarted(
                self._freeze_vision_encoder(self._starting_model()[0]))
            self.ref = copy.deepcopy(start).to(self.device).eval().requires_grad_(False)
        self.close_ids = self.tok(cfg.curriculum.think_close, add_special_tokens=False)["input_ids"]
        self.eos_ids = tuple(sorted({self.tok.eos_token_id} | set(_as_list(self.model.generation_config.eos_token_id))))

    # --- setup ---------------------------------------------------------------------------------
    def _resolve_resume(self):
        """The checkpoint to resume from (verified), or None for a fresh run. Refuses an unusable or
        busy output folder, and a folder holding a run unless told to resume or overwrite it."""
        runlock.check_output_dir(self.out)  # before anything is read from it: a live run may be writing it
        r, ckpts = self.cfg.run.resume, ckpt.list_checkpoints(self.out)
        run_files = [os.path.join(self.out, f) for f in ("metrics.jsonl", "config.json")]
        holds_run = bool(ckpts) or any(map(os.path.exists, run_files))
        if r == "auto" and holds_run and not ckpts:  # nothing to lose: it stopped before its first checkpoint
            self.log(f"[rtpo] {self.out} holds no checkpoint yet: --resume auto starts the run over from step 0")
            return None
        if r:
            try:
                return ckpt.resolve_resume(self.out if r == "auto" else r, log=self.log)
            except ckpt.CheckpointError as e:
                raise ConfigError(str(e)) from None
        if not self.cfg.run.overwrite and holds_run:
            raise ConfigError(f"run.output_dir {self.out!r} already holds a run; continue it with --resume auto, "
                              "or pick another --output_dir, or pass --run.overwrite true")
        return None

    def _amp_dtype(self):
        d = self.cfg.run.dtype
        if d == "auto":
            return torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        return None if d == "float32" else getattr(torch, d)

    def _seed_everything(self, seed):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _load_model(self):
        if self.resume_from:
            self.log(f"[rtpo] resuming from {self.resume_from}")
            if lora.enabled(self.cfg) or lora.is_adapter(self.resume_from):
                return self._lora_resume_base(), load_tokenizer(self.resume_from)
            return load_pretrained(self.resume_from), load_tokenizer(self.resume_from)
        return self._starting_model()

    # --- LoRA (rtpo/lora.py) -----------------------------------------------------------------------
    def _lora_resume_base(self):
        """The frozen base a LoRA checkpoint was trained on (its adapter is loaded by _attach_lora)."""
        r, has = self.cfg.model.lora.r, lora.is_adapter(self.resume_from)
        if not has or not r:
            raise ConfigError(f"run.resume: {self.resume_from} holds " + (
                f"full weights, not a LoRA adapter, but model.lora.r = {r}; resume with --model.lora.r 0, or start a "
                f"LoRA run from its weights with --model {self.resume_from}" if not has else
                "a LoRA adapter but model.lora.r = 0; resume with the run's --model.lora settings"))
        lora.check_matches(self.resume_from, self.cfg.model.lora)
        self._lora_base = lora.resolve_base(self.resume_from)
        return lora.load_base(self.resume_from)

    def _attach_lora(self):
        """Inject LoRA into self.model (frozen base, zero-initialised B); on resume, load the checkpoint's
        adapter. Fresh run: the adapter config names the model's own folder or hub name if the base is that
        model unchanged, else <run>/base_model, written at the first checkpoint (`_base_pending`)."""
        c = self.cfg
        if c.model.lora.bias != "none" and c.loss.beta > 0:
            raise ConfigError(f"model.lora.bias = {c.model.lora.bias!r} trains the base model's biases, so the base with "
                              "adapters disabled is no longer the starting policy that loss.beta's KL term needs; use "
                              "--model.lora.bias none, or --loss.beta 0")
        run_base = os.path.abspath(os.path.join(self.out, lora.BASE_DIR))
        self._base_pending = None
        if self.resume_from:
            base, rev = self._lora_base
        else:
            base = lora.base_source(c.model.name, changed=self._warmstart_enabled())
            rev = c.model.revision if base is not None and not os.path.isdir(base) else None
            base = run_base if base is None else base
        pm = lora.attach(self.model, c.model.lora, base, rev, seed=c.run.seed)
        if self.resume_from:
            lora.load_adapter_weights(pm, self.resume_from)
        elif base == run_base:
            # base tensors that train (biases with model.lora.bias != none), as they are before any update
            trainable = {lora.base_name(n) for n, p in self.model.named_parameters() if p.requires_grad}
            self._base_pending = {k: v.detach().clone() for k, v in lora.base_state_dict(self.model).items()
                                  if k in trainable}
        return pm

    def _freeze_vision_encoder(self, model):
        """model.freeze_vision_encoder: no gradient for a VLM's vision encoder (warm-start and RL)."""
        if self.cfg.model.freeze_vision_encoder:
            for p in vision_encoder_parameters(model):
                p.requires_grad_(False)
        return model

    def _load_vision(self):
        """The image processor of a vision-language model (saved in every checkpoint), or None. Rows with
        images and a text-only model are refused here, before anything is written."""
        c = self.cfg
        source = self.resume_from or c.model.name
        kw = {} if self.resume_from or source == "embedded-vl" else {"revision": c.model.revision,
                                                                      "trust_remote_code": c.model.trust_remote_code}
        vision = load_vision_processor(source, self.tok, self.model, max_pixels=c.model.max_pixels, **kw)
        with_images = next((e for e in self.train_rows + self.eval_rows if e.images), None)
        if with_images is not None and vision is None:
            raise ConfigError(f"data.image_field: row {with_images.index} of {c.data.dataset!r} has images, but "
                              f"model.name {c.model.name!r} is a text-only model; use a vision-language model "
                              "(e.g. --model embedded-vl, or Qwen/Qwen2.5-VL-3B-Instruct), or "
                              "--data.image_field none to drop the images")
        return vision

    def _starting_model(self):
        """(model, tokenizer) a fresh run starts from, before any warm-start."""
        # A warm-started model stands in for a pretrained checkpoint: it does not vary with run.seed.
        seed = self.cfg.warmstart.seed if self._warmstart_enabled() else self.cfg.run.seed
        return load_model_and_tokenizer(self.cfg.model, seed=seed)

    def _warmstarted(self, model):
        """`model` after the supervised warm-start (from the cache when it exists), if enabled."""
        if not self._warmstart_enabled():
            return model
        from rtpo.warmstart import warmstart

        c = self.cfg
        exclude = {e.identity for e in self.train_rows + self.eval_rows}
        rows = warmstart_rows(c.data, exclude, c.warmstart.num_examples, c.warmstart.max_operands)
        return warmstart(model, self.tok, self.builder, rows, c.warmstart, c.data, c.curriculum, self.device,
                         seed=c.warmstart.seed, log=self.log)

    def _sft_first(self) -> int:
        """sft.steps supervised steps on the training split's whole responses, hint-free prompts (the
        SFT -> GRPO baseline; LoRA: the adapter trains). Returns the tokens through forward + backward."""
        from types import SimpleNamespace

        from rtpo.warmstart import train_sft

        s = self.cfg.sft  # mix_from 1: every example shows its whole trace (rtpo.warmstart.reasoning_probability)
        wc = SimpleNamespace(steps=s.steps, lr=s.lr, batch_size=s.batch_size, mix_from=1.0, reasoning_fraction=1.0)
        self.log(f"[rtpo] sft: {s.steps} supervised steps of {s.batch_size} training examples before RL")
        _, tokens = train_sft(self.model, self.tok, self.builder, self.train_rows, wc, self.device,
                              seed=self.cfg.run.seed, log=lambda m: self.log(m.replace("[warmstart]", "[rtpo] sft")))
        return tokens

    def _set_threads(self):
        # Small models on CPU: per-op thread synchronisation costs more than the work it splits
        # (measured 25x slower update on a loaded 2-core machine with 2 threads; see README).
        n = self.cfg.run.num_threads
        if n == 0 and self.device.type == "cpu" and sum(p.numel() for p in self.model.parameters()) < 20_000_000:
            n = 1
        if n:
            torch.set_num_threads(n)

    def _warmstart_enabled(self):
        w = self.cfg.warmstart.enabled
        return w == "true" or (w == "auto" and self.cfg.model.name in ("embedded", "embedded-vl"))

    def _encode(self, rows, split):
        encs, kept, dropped, truncated, shortest = [], [], 0, 0, None
        for ex in rows:
            try:
                enc = self.builder.encode(ex)
            except PromptTooLong as e:
                dropped += 1
                shortest = e.need if shortest is None else min(shortest, e.need)
                if dropped == 1:
                    self.log(f"[rtpo] warning: {split} {e}")
                continue
            truncated += enc.truncated
            encs.append(enc)
            kept.append(ex)
        if dropped:
            self.log(f"[rtpo] warning: dropped {dropped} {split} rows whose question exceeds data.max_prompt_tokens")
        if truncated:
            self.log(f"[rtpo] warning: {truncated} {split} reasoning traces cut to fit data.max_prompt_tokens "
                     f"= {self.cfg.data.max_prompt_tokens}")
        if rows and not encs:
            images = " (its image tokens included; --model.max_pixels lowers them)" if any(e.images for e in rows) else ""
            raise ConfigError(f"no {split} rows fit data.max_prompt_tokens = {self.cfg.data.max_prompt_tokens}: the "
                              f"shortest question takes {shortest} tokens{images}; raise --data.max_prompt_tokens "
                              "above that")
        setattr(self, f"{split}_truncated", truncated)  # counted in summary.json
        setattr(self, f"{split}_dropped", dropped)
        return encs, kept

    def _check_context(self):
        """A prompt of data.max_prompt_tokens plus the longest completion must fit the model's positions:
        refuse at setup rather than silently run past the context."""
        c = self.cfg
        config = getattr(self.model, "config", None)
        ctx = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
        new = max(c.rollout.max_new_tokens, c.eval.max_new_tokens if c.eval.num_examples else 0)
        if isinstance(ctx, int) and c.data.max_prompt_tokens + new > ctx:
            raise ConfigError(f"data.max_prompt_tokens + new tokens = {c.data.max_prompt_tokens} + {new} exceeds the "
                              f"model's context of {ctx} positions; lower --data.max_prompt_tokens or "
                              "--rollout.max_new_tokens / --eval.max_new_tokens")

    def _reward_columns(self) -> list:
        """The dataset columns reward functions receive by name: every column of the rows, except names
        the trainer passes itself (warned about once). A reward function that requires an argument no
        column or trainer argument provides is refused here, before anything runs."""
        names = list(dict.fromkeys(k for ex in self.train_rows + self.eval_rows for k in ex.columns))
        clash = [n for n in names if n in RESERVED]
        if clash:
            self.log(f"[rtpo] warning: dataset column(s) {', '.join(map(repr, clash))} have the name of a reward "
                     "function argument; reward functions receive the trainer's value under that name")
        names = [n for n in names if n not in RESERVED]
        for name, (fn, _) in self.reward_fns.items():
            miss = missing_arguments(fn, set(RESERVED) | set(names))
            if miss:
                raise ConfigError(f"reward function {name!r} requires argument(s) {', '.join(map(repr, miss))}, which "
                                  f"no dataset column or trainer argument provides; dataset columns: "
                                  f"{', '.join(names) or 'none'}; trainer arguments: {', '.join(sorted(RESERVED))}")
        return names

    # --- data order: a pure function of (seed, step), so a resumed run sees the same prompts -----
    def batch_indices(self, step: int) -> list:
        """This process's contiguous share of the step's prompts (all of them in a one-process run)."""
        n, B = len(self.train_rows), self.cfg.rollout.prompts_per_step
        out = []
        for p in range(step * B, step * B + B):
            epoch, i = divmod(p, n)
            perm = (np.random.default_rng([self.cfg.run.seed, epoch]).permutation(n)
                    if self.cfg.data.shuffle else np.arange(n))
            out.append(int(perm[i]))
        return self.comm.share(out)

    # --- one step ------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _generate(self, prompts, sampling, num_samples, generator=None, **generate_kw):
        if generator is not None and self.comm.world > 1:
            # every process draws the step's whole uniform table, as one process would, and samples its columns:
            # its completions are the ones one process would sample for these rows, the generator stays in step
            rows, r = len(prompts) * num_samples, self.comm.rank
            table = draw_uniforms(sampling, rows * self.comm.world, generator)
            if table is not None:
                generate_kw["uniforms"] = table[:, r * rows:(r + 1) * rows]
            generator = None
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                return generate(self.model, prompts, sampling, num_samples=num_samples, generator=generator,
                                tokenizer=self.tok, share_prefix=self.cfg.rollout.share_prefix,
                                cache=self.cfg.rollout.cache, batch_size=self.cfg.rollout.batch_size or None,
                                **generate_kw)
        finally:
            self.model.train(was_training)

    def _decode(self, ids):
        if ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        return self.tok.decode(ids, skip_special_tokens=False)

    def step_prompts(self, step: int) -> tuple[list, list, list]:
        """(this process's example indices, their keeps, their hinted prompts as (ids, injected tokens)) at
        `step`: what `rollout` samples from (hint dropout aside), a pure function of the step and the
        checkpointed curriculum state."""
        idx = self.batch_indices(step)
        keeps = self.curriculum.example_keeps(step, idx)
        return idx, keeps, [self.builder.build(self.train_enc[i], k) for i, k in zip(idx, keeps)]

    def rollout(self, step: int) -> Rollout:
        """G completions for each of the step's prompts. Each example's prompt holds its kept hint
        (the schedule's keep, or its own with curriculum.per_example); with hint_dropout the first
        dropout_rows(G) rows of every group get the hint-free prompt instead. Row r belongs to group r // G."""
        c, G = self.cfg, self.cfg.rollout.num_generations
        keep = self.curriculum.keep(step)
        idx, keeps, hinted = self.step_prompts(step)
        encs = [self.train_enc[i] for i in idx]
        plain = [self.builder.build(e, 0.0) for e in encs]
        images = self._images(encs)  # each group's images, processed once for the rollout and the update
        n0 = dropout_rows(G, c.curriculum.hint_dropout)
        sampling = SamplingConfig(max_new_tokens=c.rollout.max_new_tokens, temperature=c.rollout.temperature,
                                  top_k=c.rollout.top_k, top_p=c.rollout.top_p, eos_token_ids=self.eos_ids,
                                  stop_strings=tuple(c.rollout.stop_strings), pad_token_id=self.tok.pad_token_id)
        # one generate call per prompt variant, so each variant's prompt is still prefilled once per group
        tis = c.loss.tis_cap > 0  # truncated importance sampling needs the sampler's own log-probs
        with self.backend.generation():
            outs = [self._generate([p for p, _ in variant], sampling, n, generator=self.gen, return_logprobs=tis,
                                   images=images) if n else None for variant, n in ((plain, n0), (hinted, G - n0))]
        ro = Rollout(keep=keep, idx=idx, keeps=keeps, hinted_rows=G - n0,
                     hint_targets=[self.builder.hint_target(e, k) for e, k in zip(encs, keeps)])
        for g, (e, k) in enumerate(zip(encs, keeps)):
            for j in range(G):
                hint = j >= n0
                out, r = (outs[1], g * (G - n0) + j - n0) if hint else (outs[0], g * n0 + j)
                prompt, injected = hinted[g] if hint else plain[g]
                ro.prompts.append(prompt)
                ro.completions.append(out.completions[r])
                ro.rollout_logprobs.append(out.logprobs[r] if out.logprobs is not None else None)
                ro.finish_reasons.append(out.finish_reasons[r])
                ro.injected.append(injected)
                ro.row_keep.append(k if hint else 0.0)
                ro.prefixes.append(self.builder.prefix_text(e, k) if hint else "")
        ro.images = None if images is None else expand(images, G)
        if c.loss.sft_loss > 0:
            eos = self.tok.eos_token_id
            ro.sft_targets = [(list(e.base), response_ids(self.builder, self.train_rows[i], e, eos))
                              for i, e in zip(idx, encs)]
        examples = expand([self.train_rows[i] for i in idx], G)
        ro.answers, ro.questions = [ex.answer for ex in examples], [ex.question for ex in examples]
        return ro

    def _images(self, encs) -> list | None:
        """Per example, its images as model inputs (None for a row without); None when no example has any,
        so that text-only runs take exactly the text path."""
        if not any(e.images for e in encs):
            return None
        return [self.builder.image_inputs(e) for e in encs]

    def reward_kwargs(self, rows, prompts, completion_ids, texts, prefixes, finish_reasons, keeps,
                      max_new_tokens) -> dict:
        """The keyword arguments of every reward call (the signature is in rtpo/rewards.py), one entry per
        completion: `rows` are the Examples the completions answer, `prompts` their prompt token ids."""
        decoded, prompt_texts = {}, []
        for p in prompts:  # the G rows of a group share one prompt list: decode it once
            if id(p) not in decoded:
                decoded[id(p)] = self.tok.decode(p, skip_special_tokens=False)
            prompt_texts.append(decoded[id(p)])
        kw = {name: [ex.columns.get(name) for ex in rows] for name in self.column_names}
        kw.update(prompts=prompt_texts, completion_ids=[list(c) for c in completion_ids],
                  responses=[p + t for p, t in zip(prefixes, texts)], questions=[ex.question for ex in rows],
                  finish_reasons=list(finish_reasons), completion_lengths=[len(c) for c in completion_ids],
                  keeps=[float(k) for k in keeps], max_new_tokens=max_new_tokens,
                  think_open=self.cfg.curriculum.think_open, think_close=self.cfg.curriculum.think_close,
                  step=self.step)
        return kw

    def score(self, ro: Rollout) -> Scores:
        """Rewards of this process's rows, gathered over processes, then group advantages on the whole
        batch (so scale_rewards = batch uses every process's rewards); this process keeps its own rows'."""
        G = self.cfg.rollout.num_generations
        texts = [self._decode(c) for c in ro.completions]
        ctx = self.reward_kwargs(expand([self.train_rows[i] for i in ro.idx], G), ro.prompts, ro.completions, texts,
                                 ro.prefixes, ro.finish_reasons, ro.row_keep, self.cfg.rollout.max_new_tokens)
        try:
            total, per_fn = score(self.reward_fns, texts, ro.answers, **ctx)
        except RewardError as e:
            raise TrainingError(f"step {self.step}: {e}. Fix it, then continue from the last checkpoint with "
                                "--resume auto") from None
        acc = per_fn.get("accuracy") or accuracy_reward(texts, ro.answers, **ctx)
        sc = self._gathered(Scores(rewards=torch.tensor(total, dtype=torch.float32), per_fn=per_fn, accuracy=acc,
                                   texts=texts, group_idx=list(ro.idx), group_keeps=list(ro.keeps)))
        adv = group_advantages(sc.rewards, G, self.cfg.loss.scale_rewards, self.cfg.loss.adv_eps)
        lo = self.comm.rank * len(ro)
        sc.advantages = adv[lo:lo + len(ro)]
        self._last_scored = (ro, sc, ctx["prompts"])  # samples.jsonl reads the step's rollout from here
        return sc

    def _gathered(self, sc: Scores) -> Scores:
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
                      group_idx=[i for g, _ in groups for i in g], group_keeps=[k for _, ks in groups for k in ks])

    def loss_rows(self, ro: Rollout) -> LossRows:
        """The rows as the update's log-prob passes see them (stages.LossRows). loss.hint_advantage: a
        hinted row's injected hint moves from its prompt to the start of its completion."""
        top = self.cfg.loss.hint_top_entropy
        if not self.cfg.loss.hint_advantage:
            return LossRows(ro.prompts, ro.completions, [0] * len(ro), [0] * len(ro))
        G, prompts, comps, lens = self.cfg.rollout.num_generations, [], [], []
        for i in range(len(ro)):
            context, hint = ro.hint_targets[i // G]
            hinted = ro.row_keep[i] > 0 and bool(hint)
            prompts.append(context if hinted else ro.prompts[i])  # a group's contexts are one list: shared prefix
            comps.append(hint + ro.completions[i] if hinted else ro.completions[i])
            lens.append(len(hint) if hinted else 0)
        return LossRows(prompts, comps, lens, [hint_tokens_kept(h, top) for h in lens])

    def _micro_batches(self, lr: LossRows, rows: list) -> list:
        """`rows` cut into consecutive micro batches: optim.micro_batch_size rows each, or with
        optim.micro_batch_tokens at most that many real tokens each (a group's prompt counted once when
        shared). Under DDP / DeepSpeed every process must run the same fixed number of micro batches per
        update (the engine's gradient_accumulation_steps, collectives in each backward): there the token
        budget is not a cap but a balance: exactly that number, cut where the tokens are most even."""
        o = self.cfg.optim
        if o.micro_batch_tokens <= 0:
            return [rows[i:i + o.micro_batch_size] for i in range(0, len(rows), o.micro_batch_size)]
        costs = row_tokens(lr.prompts, lr.completions, rows, share_prefix=o.packing and o.share_prefix)
        fixed = getattr(self.backend, "gas", None)
        return split_even(rows, costs, fixed) if fixed else split_by_tokens(rows, costs, o.micro_batch_tokens)

    def _batch(self, prompts: list, completions: list, images=None) -> dict:
        """The log-prob batch of these rows (and their images, if any): packed, each distinct prompt once
        (optim.packing / share_prefix), or padded where the model cannot take a packed batch (rtpo.logprobs.make_batch)."""
        o = self.cfg.optim
        return make_batch(self.model, prompts, completions, self.tok.pad_token_id, self.device, packing=o.packing,
                          share_prefix=o.share_prefix, images=images)

    @torch.no_grad()
    def _logprobs_no_grad(self, ro, lr, micro, ref=False):
        out = []
        for mb in micro:
            batch = self._batch([lr.prompts[i] for i in mb], [lr.completions[i] for i in mb],
                                images=self._row_images(ro, mb))
            with self._autocast():
                lp, _ = self.backend.logprobs(batch, ref=ref, with_entropy=False)
            out.append(lp.float())
        return out

    def update(self, ro: Rollout, sc: Scores) -> dict:
        """loss.num_iterations passes over the step's rows, each in optim.mini_batches optimizer updates
        accumulated over micro batches of optim.micro_batch_size rows."""
        c = self.cfg
        lr = self.loss_rows(ro)
        minis = [[int(i) for i in s] for s in np.array_split(np.arange(len(ro)), c.optim.mini_batches) if len(s)]
        micro_of = [self._micro_batches(lr, mb) for mb in minis]
        t0 = time.perf_counter()
        old = [self._logprobs_no_grad(ro, lr, mic) for mic in micro_of] if self.updates_per_step > 1 else None
        t1 = time.perf_counter()
        ref = [self._logprobs_no_grad(ro, lr, mic, ref=True) for mic in micro_of] if self.ref is not None else None
        stats = UpdateStats(time_old_logprobs=t1 - t0, time_reference=time.perf_counter() - t1)
        self.model.train()
        for it in range(c.loss.num_iterations):
            for m, (mb, micro) in enumerate(zip(minis, micro_of)):
                n_tokens, n_seqs = self._normalizers(lr, mb)
                sup = self._supervised(ro, mb)
                self.backend.zero_grad()
                loss_total = 0.0
                for j, rows in enumerate(micro):
                    # the supervised rows ride on the last micro batch: one forward/backward per micro batch,
                    # as every backend (DeepSpeed's gradient accumulation included) expects
                    last = j == len(micro) - 1
                    loss, st = self._micro_loss(ro, lr, sc, rows, sup if last else [], n_tokens, n_seqs,
                                                old[m][j] if old else None, ref[m][j] if ref else None)
                    self.backend.backward(loss)
                    loss_total += loss.item()
                    if it == 0:
                        stats.add_micro(st)
                    stats.add_tokens(st["fwd_tokens"], st["sup_tokens"])
                grad_norm = self.backend.step(loss_finite=math.isfinite(loss_total))
                if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
                    self.log(f"[rtpo] step {self.step}: non-finite loss ({loss_total}) or grad norm ({grad_norm}); "
                             "update skipped")
                stats.add_update(loss_total, grad_norm)
        return stats.metrics(self.updates_per_step, kl=c.loss.beta > 0, tis=c.loss.tis_cap > 0)

    def _micro_loss(self, ro, lr, sc, rows, sup, n_tokens, n_seqs, old_lp, ref_lp):
        """Loss of one micro batch: the policy-gradient loss of `rows` (as `lr` lays them out), plus each
        supervised term of `sup` (hint loss, SFT loss): its weight times the negative log-likelihood of its
        targets over the update's target tokens of all processes, computed in the same forward as extra
        rows (they never enter the policy-gradient terms)."""
        c, n = self.cfg, len(rows)
        comps = [lr.completions[i] for i in rows]
        prompts = [lr.prompts[i] for i in rows] + [x for t in sup for x in t.contexts]
        targets = comps + [x for t in sup for x in t.targets]
        images = None if ro.images is None else self._row_images(ro, rows) + [x for t in sup for x in t.images]
        batch = self._batch(prompts, targets, images=images)
        with self._autocast():
            logp_all, ent_all = self.backend.logprobs(batch)
        T = max(max((len(x) for x in comps), default=0), 1)  # the policy rows' width (= old/ref passes')
        logp, mask = logp_all[:n, :T], batch["completion_mask"][:n, :T]
        hint_lens = [lr.hint_lens[i] for i in rows]
        if any(hint_lens):  # loss.hint_advantage: only the kept hint tokens (highest entropy) get the advantage
            mask = hint_token_mask(mask, ent_all[:n, :T], hint_lens, c.loss.hint_top_entropy)
        loss, st = policy_loss(
            logp.float(), old_lp[:, :T] if old_lp is not None else logp.detach(),
            sc.advantages[rows].to(self.device), mask, loss_type=c.loss.loss_type, eps_low=c.loss.epsilon_low,
            eps_high=c.loss.epsilon_high, beta=c.loss.beta, ref_logp=ref_lp[:, :T] if ref_lp is not None else None,
            entropy=ent_all[:n, :T].float() if ent_all is not None else None, entropy_coef=c.loss.entropy_coef,
            n_seqs=n_seqs, n_tokens=n_tokens, max_len=c.rollout.max_new_tokens, importance=c.loss.importance,
            rollout_logp=self._rollout_logprobs(ro, rows, T), tis_cap=c.loss.tis_cap, tis_level=c.loss.tis_level)
        st["tokens"] = int(mask.sum().item())
        st["fwd_tokens"] = sum(row_tokens(prompts, targets, list(range(len(prompts))),
                                          share_prefix=c.optim.packing and c.optim.share_prefix))
        st["sup_tokens"] = sum(len(x) for t in sup for x in t.targets)
        lo = n
        for t in sup:  # the normaliser is global, as the policy loss's: the processes' shares sum to the whole
            hi = lo + len(t.targets)
            nll = hint_nll(logp_all[lo:hi].float(), batch["completion_mask"][lo:hi], n_tokens=t.n_tokens)
            loss = loss + t.weight * nll
            st[f"{t.name}_nll"] = nll.item()
            lo = hi
        return loss, st

    def _rollout_logprobs(self, ro, rows, T):
        """[len(rows), T] the sampler's log-probs of the rows' tokens (0 on padding); None without TIS."""
        if self.cfg.loss.tis_cap <= 0:
            return None
        out = torch.zeros((len(rows), T), dtype=torch.float32)
        for a, i in enumerate(rows):
            lps = ro.rollout_logprobs[i]
            out[a, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
        return out.to(self.device)

    def _supervised(self, ro, rows) -> list:
        """The update's supervised terms for the groups that start in `rows`: the hint loss (groups that carry
        a hint: the injected text after its context) and the SFT loss (every group: the whole response after
        the hint-free prompt), each with its weight at this step and its global token count."""
        c, G = self.cfg, self.cfg.rollout.num_generations
        starts = [i for i in rows if i % G == 0]
        terms = []
        if c.loss.hint_loss:
            hinted = [i for i in starts if ro.hint_targets[i // G][1]]
            terms.append(Supervised("hint", [ro.hint_targets[i // G][0] for i in hinted],
                                    [ro.hint_targets[i // G][1] for i in hinted], self._row_images(ro, hinted) or [],
                                    c.loss.hint_loss))
        w = sft_weight(self.step, c.loss.sft_loss, c.loss.sft_decay, c.curriculum, c.run.max_steps)
        if c.loss.sft_loss and w > 0:
            terms.append(Supervised("sft", [ro.sft_targets[i // G][0] for i in starts],
                                    [ro.sft_targets[i // G][1] for i in starts], self._row_images(ro, starts) or [], w))
        counts = self.comm.sum([sum(len(x) for x in t.targets) for t in terms]) if terms else []
        for t, n in zip(terms, counts):
            t.n_tokens = int(n)
        return [t for t in terms if t.n_tokens]

    @staticmethod
    def _row_images(ro, rows) -> list | None:
        """The images of rollout rows `rows` (None for a run without images)."""
        return None if ro.images is None else [ro.images[i] for i in rows]

    def _normalizers(self, lr: LossRows, rows) -> tuple:
        """(policy-loss tokens, sequences) of the update that `rows` belong to: the loss normalisers.
        Counted over all processes: each process's loss is its share of the global loss. A row's tokens are
        its completion's, its injected hint counted only for the tokens that enter the loss."""
        own = sum(len(lr.completions[i]) - lr.hint_lens[i] + lr.hint_kept[i] for i in rows)
        n_tokens, n_seqs = self.comm.sum([own, len(rows)])
        return int(n_tokens), int(n_seqs)

    # computed from the gathered rewards (or the same on every process): already global
    reduce_as("same", "step", "keep", "lr", "reward", "reward_std", "accuracy", "zero_var_groups", "all_wrong_groups",
              "all_right_groups", "mean_example_keep")

    def train_step(self, step: int) -> dict:
        t0 = time.perf_counter()
        ro = self.rollout(step)
        t1 = time.perf_counter()
        sc = self.score(ro)
        t2 = time.perf_counter()
        up = self.update(ro, sc)
        G = self.cfg.rollout.num_generations
        acc = float(np.mean(sc.accuracy))
        self.curriculum.observe(step, acc)
        per_group = torch.tensor(sc.accuracy, dtype=torch.float32).view(-1, G)
        # an example's own keep follows the rows that carried its hint (all rows if dropout took them all)
        hinted = per_group[:, G - ro.hinted_rows:] if ro.hinted_rows else per_group
        self.curriculum.observe_examples(sc.group_idx, sc.group_keeps, hinted.mean(1).tolist())
        all_wrong, all_right = group_outcomes(per_group)
        comp_lens = [len(x) for x in ro.completions]
        row = {
            "step": step, "keep": ro.keep, "injected_tokens": float(np.mean(ro.injected)),
            "mean_example_keep": float(np.mean(sc.group_keeps)),
            "completion_tokens": float(np.mean(comp_lens)),
            "reasoning_tokens": float(np.mean([reasoning_length(x, self.close_ids) for x in ro.completions])),
            "reward": float(sc.rewards.mean()), "reward_std": float(sc.rewards.std()),
            "accuracy": acc, "zero_var_groups": zero_variance_fraction(sc.rewards, G),
            "all_wrong_groups": all_wrong, "all_right_groups": all_right,
            "truncated_completions": float(np.mean([r == "length" for r in ro.finish_reasons])),
        }
        for name, vals in sc.per_fn.items():
            row[f"reward/{name}"] = float(np.mean(vals))
            row[f"reward_std/{name}"] = float(np.std(vals))
        row.update({k: v for k, v in up.items()})
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

    # --- evaluation ----------------------------------------------------------------------------
    def greedy_completions(self, prompts: list, progress=None, encs=None) -> tuple:
        """Greedy completions (eval settings, in eval.batch_size chunks) -> (token lists, finish reasons).
        `progress(n)`, if given, is called after each chunk with its number of rows. `encs`: the prompts'
        encoded examples, whose images (if any) go with them."""
        e = self.cfg.eval
        sampling = SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=0.0, eos_token_ids=self.eos_ids,
                                  stop_strings=tuple(self.cfg.rollout.stop_strings), pad_token_id=self.tok.pad_token_id)
        comps, reasons = [], []
        for i in range(0, len(prompts), e.batch_size):
            images = self._images(encs[i:i + e.batch_size]) if encs is not None else None
            out = self._generate(prompts[i:i + e.batch_size], sampling, 1, images=images)
            comps += out.completions
            reasons += out.finish_reasons
            if progress is not None:
                progress(len(out.completions))
        return comps, reasons

    @torch.no_grad()
    def evaluate_at(self, keep: float, encs: list, rows: list, progress=None) -> tuple:
        """Greedy completions of `rows` (encoded as `encs`) prompted with their traces cut at `keep`
        (0: the evaluation prompt, no hint), scored as in training -> (metrics, one record per row).
        metrics: accuracy, format, reasoning_tokens and completion_tokens (generated tokens),
        injected_tokens, and reward/<name> for every configured reward function."""
        if not encs:
            return {}, []
        built = [self.builder.build(enc, keep) for enc in encs]
        prompts = [p for p, _ in built]
        prefixes = [self.builder.prefix_text(enc, keep) for enc in encs]
        comps, reasons = self.greedy_completions(prompts, progress=progress, encs=encs)
        texts = [self._decode(x) for x in comps]
        answers = [r.answer for r in rows]
        kw = self.reward_kwargs(rows, prompts, comps, texts, prefixes, reasons, [keep] * len(rows),
                                self.cfg.eval.max_new_tokens)
        acc = accuracy_reward(texts, answers, **kw)
        fmt = format_reward(texts, answers, **kw)
        try:
            _, per_fn = score(self.reward_fns, texts, answers, **kw)
        except RewardError as e:
            raise TrainingError(f"evaluation at step {self.step}: {e}") from None
        metrics = {"accuracy": float(np.mean(acc)), "format": float(np.mean(fmt)),
                   "reasoning_tokens": float(np.mean([reasoning_length(x, self.close_ids) for x in comps])),
                   "completion_tokens": float(np.mean([len(x) for x in comps])),
                   "injected_tokens": float(np.mean([k for _, k in built]))}
        metrics.update({f"reward/{k}": float(np.mean(v)) for k, v in per_fn.items()})
        records = [{"prompt": kw["prompts"][i], "keep": float(keep), "injected_tokens": built[i][1],
                    "completion": texts[i], "answer": answers[i], "correct": bool(acc[i]),
                    "rewards": {k: v[i] for k, v in per_fn.items()}, "finish_reason": reasons[i],
                    "completion_tokens": len(comps[i]), "example": rows[i].index} for i in range(len(rows))]
        return metrics, records

    def evaluate(self) -> dict:
        """Greedy, NO hint (the prompts a user would send), on the held-out rows."""
        e = self.cfg.eval
        encs, rows = self.eval_enc[: e.num_examples], self.eval_rows[: e.num_examples]
        lo, hi = self.comm.bounds(len(encs))  # sharded over processes, means combined by example counts
        metrics = {}
        if hi > lo:
            with self.backend.generation():
                metrics, records = self.evaluate_at(0.0, encs[lo:hi], rows[lo:hi])
            self._eval_samples = records[: self.cfg.log.sample_eval_rows]  # samples.jsonl
        metrics = {f"eval/{k}": v for k, v in metrics.items() if k != "injected_tokens"}
        return self.comm.weighted_mean(hi - lo, metrics)

    def sample_records(self, step: int, train: bool = True) -> list:
        """samples.jsonl rows: every completion of the last scored rollout's first log.sample_groups
        groups (prompt, hint fraction, completion, reward per function, advantage), then the records
        of the last evaluation's first log.sample_eval_rows rows (once)."""
        out, G = [], self.cfg.rollout.num_generations
        last = getattr(self, "_last_scored", None)
        if train and last is not None:
            ro, sc, prompts = last
            for r in range(min(self.cfg.log.sample_groups * G, len(ro.completions))):
                out.append({"step": step, "split": "train", "group": r // G, "example": self.train_rows[ro.idx[r // G]].index,
                            "prompt": prompts[r], "keep": float(ro.row_keep[r]), "injected_tokens": ro.injected[r],
                            "completion": sc.texts[r], "answer": ro.answers[r], "reward": float(sc.rewards[r]),
                            "rewards": {k: v[r] for k, v in sc.per_fn.items()},
                            "advantage": float(sc.advantages[r]), "finish_reason": ro.finish_reasons[r],
                            "completion_tokens": len(ro.completions[r])})
        out += [{"step": step, "split": "eval", **rec} for rec in getattr(self, "_eval_samples", [])]
        self._eval_samples = []
        return out

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step, **self.backend.state_dict(),  # optimizer, scheduler
            "curriculum": self.curriculum.state_dict(), "generator": self.gen.get_state(),
            "rng": ckpt.rng_state(),
            "consecutive_skips": self.consecutive_skips, "skipped_total": self.skipped_total,
            "config": self.cfg.to_dict(),
        }

    def _write_checkpoint(self, tmp) -> None:
        """Every process: its backend's shards; the main process: HF weights, tokenizer, trainer_state.pt."""
        tmp = self.comm.broadcast(tmp)  # the main process's temporary folder, from ckpt.save_checkpoint
        self.backend.save_shards(tmp)
        base = self._base_pending if self.peft is not None else None  # LoRA, once per run: the base it names
        with self.backend.full_weights(trainable_only=self.peft is not None and base is None):  # same on every process
            if self.comm.is_main:
                if self.peft is None:
                    self.model.save_pretrained(tmp)
                else:
                    if base is not None:
                        lora.write_base(self.model, self.tok, os.path.join(self.out, lora.BASE_DIR), base)
                    lora.save_adapter(self.peft, tmp)
                self.tok.save_pretrained(tmp)
                if self.vision is not None:  # the image processor: rtpo.eval and resume read it back
                    self.vision.save_pretrained(tmp)
                ckpt.save_state(tmp, self.state_dict())
        self._base_pending = None
        self.comm.barrier()  # every shard is written before the main process fsyncs and renames the folder

    def save(self) -> str:
        """The checkpoint of this step (its path, on every process once it is in place)."""
        if not self.comm.is_main:
            self._write_checkpoint(None)
            return self.comm.broadcast(None)
        try:
            path = ckpt.save_checkpoint(self.out, self.step, self._write_checkpoint, self.cfg.checkpoint.keep_last)
        except OSError as e:  # e.g. a full disk: the failed save removed its folder, older checkpoints are untouched
            older = ckpt.list_checkpoints(self.out)
            kept = f"the previous checkpoint {older[-1][1]} is intact" if older else "no checkpoint was written before"
            raise TrainingError(f"saving the checkpoint of step {self.step} failed: {e}; {kept}. Free space (or fix "
                                "the folder), then continue with --resume auto") from None
        self.log(f"[rtpo] checkpoint saved: {path}")
        return self.comm.broadcast(path)

    def _load_state(self, path: str) -> None:
        try:
            st = ckpt.load_state(path)  # first: nothing else of the folder is unpickled if this file is unsafe
        except ckpt.CheckpointError as e:
            raise ConfigError(f"run.resume: {e}") from None
        self.backend.load_shards(path)  # before the schedule state below, which wins
        self.step = st["step"]
        self.backend.load_state_dict(st)
        self.curriculum.load_state_dict(st["curriculum"])
        self.gen.set_state(st["generator"])
        ckpt.set_rng_state(st["rng"])
        self.consecutive_skips = st["consecutive_skips"]
        self.skipped_total = st["skipped_total"]

    # --- the loop ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self._signalled:  # a second signal: the user does not want to wait for the step to end
            self._quit_now(name)
        self._signalled = name
        if self.comm.world == 1:  # otherwise train_step stops every process at the same step
            self._stop_signal = name
        # os.write, not print: a handler that prints while the interrupted code prints raises
        os.write(2, f"[rtpo] {name}: stopping after this step with a checkpoint; send {name} again to quit at "
                    "once without saving\n".encode())

    def _quit_now(self, name: str):
        raise ForcedQuit(f"{name} received twice: quit without saving; the checkpoints in {self.out} are as they "
                         "were: continue with --resume auto")

    def train(self) -> dict:
        """Train to run.max_steps (or a stop), holding the run folder's lock throughout (rtpo/runlock.py)."""
        main = self.comm.is_main  # the main process alone writes the run folder and holds its lock
        if main:
            os.makedirs(self.out, exist_ok=True)
        lock = runlock.acquire(self.out, log=self.log) if main else None
        try:
            if main and self.resume_from is None:  # a fresh run over an old one (--run.overwrite): drop its checkpoints
                ckpt.remove_checkpoints(self.out)
            return self._train()
        finally:
            if lock:
                lock.release()

    def _train(self) -> dict:
        from tqdm.auto import tqdm

        c, main = self.cfg, self.comm.is_main
        resume_step = self.step if self.resume_from else None
        if main:
            save_config(c, os.path.join(self.out, "config.json"))
        metrics = MetricsLog(os.path.join(self.out, "metrics.jsonl"), resume_step) if main else NoLog()
        samples = MetricsLog(os.path.join(self.out, "samples.jsonl"), resume_step) if main else NoLog()
        reporter = make_reporter(c.log.report_to, self.out, project=c.log.project, config=c.to_dict(),
                                 resume_step=resume_step)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        t_start, start = time.perf_counter(), self.step
        first_eval = last_eval = None
        bar = tqdm(total=c.run.max_steps, initial=self.step, disable=not c.log.progress, dynamic_ncols=True,
                   desc="rtpo")
        try:
            while self.step < c.run.max_steps:
                row = {}
                if c.eval.num_examples and (self.step == 0 or (c.eval.every and self.step % c.eval.every == 0)):
                    row.update(self.evaluate())
                    first_eval = first_eval or row
                row.update(self.train_step(self.step))
                metrics.write(row)
                reporter.log(row, self.step)
                if self.step == 0 or (c.eval.every and self.step % c.eval.every == 0):
                    samples.write_many(self.sample_records(self.step))
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
                samples.write_many(self.sample_records(self.step, train=False))
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
        c = self.cfg
        summary = {"steps": self.step, "checkpoint": path, "wall_seconds": seconds,
                   "eval_before": {k: v for k, v in (first_eval or {}).items() if k.startswith("eval/")},
                   "eval_after": {k: v for k, v in (last_eval or {}).items() if k.startswith("eval/")},
                   "skipped_updates": self.skipped_total, "sft_tokens": self.sft_tokens,
                   "truncated_traces": {"train": self.train_truncated, "eval": self.eval_truncated},
                   "dropped_rows": {"train": self.train_dropped, "eval": self.eval_dropped}}
        if c.log.plot:
            png = plot_metrics(os.path.join(self.out, "metrics.jsonl"), os.path.join(self.out, "curves.png"))
            self.log(f"[rtpo] plot: {png}" if png else "[rtpo] matplotlib not installed: no plot "
                     "(pip install 'rtpo[plot]')")
        if self.comm.is_main:
            ckpt.write_json(os.path.join(self.out, "summary.json"), summary)  # atomic: a kill leaves the old file or the new
        if summary["eval_before"] and summary["eval_after"]:
            self.log(before_after_table(summary["eval_before"], summary["eval_after"],
                                        f"[rtpo] held-out, no hint ({min(c.eval.num_examples, len(self.eval_enc))} "
                                        f"rows, greedy), step {start} -> {self.step}:"))
        return summary

    def _track_skips(self, row):
        skipped = row.get("skipped_updates", 0)
        self.skipped_total += skipped
        self.consecutive_skips = self.consecutive_skips + 1 if skipped == self.updates_per_step else 0
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


def _as_list(x):
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
