"""The training loop. It orchestrates; the math lives in curriculum / advantages / losses / rewards.

One training step:
    prompts (curriculum cut at keep(step)) -> G completions each (rtpo.generation)
    -> rewards -> group advantages -> (old / reference log-probs)
    -> num_iterations x mini_batches optimizer updates, each accumulating over micro batches.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import time

import numpy as np
import torch

from rtpo import checkpoint as ckpt
from rtpo.advantages import group_advantages, group_outcomes, zero_variance_fraction
from rtpo.config import ConfigError, RTPOConfig, save as save_config
from rtpo.curriculum import Curriculum, PromptBuilder, PromptTooLong, dropout_rows
from rtpo.data import load_splits, warmstart_rows
from rtpo.generation import SamplingConfig, generate
from rtpo.logprobs import collate, completion_logprobs
from rtpo.losses import hint_nll, policy_loss
from rtpo.metrics import MetricsLog, plot_metrics
from rtpo.models import load_model_and_tokenizer, load_tokenizer
from rtpo.rewards import RewardError, accuracy_reward, build_reward_functions, format_reward, score


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite updates); a checkpoint of the last good state was saved."""


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


class Trainer:
    def __init__(self, cfg: RTPOConfig, log=None):
        self.cfg = cfg
        self.out = cfg.run.output_dir
        self.log = log or (lambda msg: print(msg, flush=True))
        self.resume_from = self._resolve_resume()
        try:
            self.reward_fns = build_reward_functions(cfg.rewards)
        except ValueError as e:
            raise ConfigError(f"rewards.custom: {e}") from None
        self.device = pick_device(cfg.run.device)
        self.amp_dtype = self._amp_dtype()
        self._seed_everything(cfg.run.seed)

        self.train_rows, self.eval_rows = load_splits(cfg.data)
        self.model, self.tok = self._load_model()
        self._check_context()
        self._set_threads()
        self.builder = PromptBuilder(self.tok, cfg.curriculum, cfg.data.max_prompt_tokens, cfg.data.system_prompt)
        self.train_enc, self.train_rows = self._encode(self.train_rows, "train")
        self.eval_enc, self.eval_rows = self._encode(self.eval_rows, "eval")
        if self.resume_from is None:
            self.model = self._warmstarted(self.model)
        self.model.to(self.device)
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.ref = None
        if cfg.loss.beta > 0:  # a frozen copy of the STARTING policy, also when resuming
            start = self.model if self.resume_from is None else self._warmstarted(self._starting_model()[0])
            self.ref = copy.deepcopy(start).to(self.device).eval().requires_grad_(False)

        self.close_ids = self.tok(cfg.curriculum.think_close, add_special_tokens=False)["input_ids"]
        self.eos_ids = tuple(sorted({self.tok.eos_token_id} | set(_as_list(self.model.generation_config.eos_token_id))))
        self.updates_per_step = cfg.loss.num_iterations * cfg.optim.mini_batches
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                           eps=o.eps, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(o.lr_schedule, o.lr_warmup_steps, cfg.run.max_steps * self.updates_per_step))
        self.curriculum = Curriculum(cfg.curriculum, cfg.run.max_steps)
        self.gen = torch.Generator().manual_seed(cfg.run.seed)
        self.step = 0
        self.consecutive_skips = 0
        self.skipped_total = 0
        self._stop_signal = None
        if self.resume_from:
            self._load_state(self.resume_from)

    # --- setup ---------------------------------------------------------------------------------
    def _resolve_resume(self):
        r = self.cfg.run.resume
        if r:
            path = self.out if r == "auto" else r
            try:
                return ckpt.resolve_resume(path)
            except FileNotFoundError as e:
                raise ConfigError(str(e)) from None
        if not self.cfg.run.overwrite and (os.path.exists(os.path.join(self.out, "metrics.jsonl"))
                                           or ckpt.list_checkpoints(self.out)):
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
            from transformers import AutoModelForCausalLM

            self.log(f"[rtpo] resuming from {self.resume_from}")
            model = AutoModelForCausalLM.from_pretrained(self.resume_from, dtype=torch.float32)
            return model, load_tokenizer(self.resume_from)
        return self._starting_model()

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
        exclude = {e.question for e in self.train_rows + self.eval_rows}
        rows = warmstart_rows(c.data, exclude, c.warmstart.num_examples, c.warmstart.max_operands)
        return warmstart(model, self.tok, self.builder, rows, c.warmstart, c.data, c.curriculum, self.device,
                         seed=c.warmstart.seed, log=self.log)

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
        return w == "true" or (w == "auto" and self.cfg.model.name == "embedded")

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
            raise ConfigError(f"no {split} rows fit data.max_prompt_tokens = {self.cfg.data.max_prompt_tokens}: the "
                              f"shortest question takes {shortest} tokens; raise --data.max_prompt_tokens above that")
        setattr(self, f"{split}_truncated", truncated)  # counted in summary.json
        setattr(self, f"{split}_dropped", dropped)
        return encs, kept

    def _check_context(self):
        """A prompt of data.max_prompt_tokens plus the longest completion must fit the model's positions:
        refuse at setup rather than silently run past the context."""
        c = self.cfg
        ctx = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        new = max(c.rollout.max_new_tokens, c.eval.max_new_tokens if c.eval.num_examples else 0)
        if isinstance(ctx, int) and c.data.max_prompt_tokens + new > ctx:
            raise ConfigError(f"data.max_prompt_tokens + new tokens = {c.data.max_prompt_tokens} + {new} exceeds the "
                              f"model's context of {ctx} positions; lower --data.max_prompt_tokens or "
                              "--rollout.max_new_tokens / --eval.max_new_tokens")

    # --- data order: a pure function of (seed, step), so a resumed run sees the same prompts -----
    def batch_indices(self, step: int) -> list:
        n, B = len(self.train_rows), self.cfg.rollout.prompts_per_step
        out = []
        for p in range(step * B, step * B + B):
            epoch, i = divmod(p, n)
            perm = (np.random.default_rng([self.cfg.run.seed, epoch]).permutation(n)
                    if self.cfg.data.shuffle else np.arange(n))
            out.append(int(perm[i]))
        return out

    # --- one step ------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _generate(self, prompts, sampling, num_samples, generator=None, **generate_kw):
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

    def rollout(self, step: int) -> dict:
        """G completions for each of the step's prompts. Each example's prompt holds its kept hint
        (the schedule's keep, or its own with curriculum.per_example); with hint_dropout the first
        dropout_rows(G) rows of every group get the hint-free prompt instead. Row r belongs to group r // G."""
        c, G = self.cfg, self.cfg.rollout.num_generations
        keep = self.curriculum.keep(step)
        idx = self.batch_indices(step)
        keeps = self.curriculum.example_keeps(step, idx)
        encs = [self.train_enc[i] for i in idx]
        hinted = [self.builder.build(e, k) for e, k in zip(encs, keeps)]
        plain = [self.builder.build(e, 0.0) for e in encs]
        n0 = dropout_rows(G, c.curriculum.hint_dropout)
        sampling = SamplingConfig(max_new_tokens=c.rollout.max_new_tokens, temperature=c.rollout.temperature,
                                  top_k=c.rollout.top_k, top_p=c.rollout.top_p, eos_token_ids=self.eos_ids,
                                  stop_strings=tuple(c.rollout.stop_strings), pad_token_id=self.tok.pad_token_id)
        # one generate call per prompt variant, so each variant's prompt is still prefilled once per group
        outs = [self._generate([p for p, _ in variant], sampling, n, generator=self.gen) if n else None
                for variant, n in ((plain, n0), (hinted, G - n0))]
        rows = {k: [] for k in ("prompts", "completions", "finish_reasons", "injected", "prefixes", "row_keep")}
        for g, (e, k) in enumerate(zip(encs, keeps)):
            for j in range(G):
                hint = j >= n0
                out, r = (outs[1], g * (G - n0) + j - n0) if hint else (outs[0], g * n0 + j)
                prompt, injected = hinted[g] if hint else plain[g]
                rows["prompts"].append(prompt)
                rows["completions"].append(out.completions[r])
                rows["finish_reasons"].append(out.finish_reasons[r])
                rows["injected"].append(injected)
                rows["row_keep"].append(k if hint else 0.0)
                rows["prefixes"].append(self.builder.prefix_text(e, k) if hint else "")
        return {"keep": keep, "idx": idx, "keeps": keeps, "hint_targets": [self.builder.hint_target(e, k)
                                                                           for e, k in zip(encs, keeps)],
                "hinted_rows": G - n0, **rows,
                "answers": [self.train_rows[idx[r // G]].answer for r in range(len(rows["prompts"]))],
                "questions": [self.train_rows[idx[r // G]].question for r in range(len(rows["prompts"]))]}

    def score(self, ro: dict) -> dict:
        texts = [self._decode(c) for c in ro["completions"]]
        ctx = dict(responses=[p + t for p, t in zip(ro["prefixes"], texts)], questions=ro["questions"],
                   finish_reasons=ro["finish_reasons"], completion_lengths=[len(c) for c in ro["completions"]],
                   max_new_tokens=self.cfg.rollout.max_new_tokens, think_open=self.cfg.curriculum.think_open,
                   think_close=self.cfg.curriculum.think_close)
        try:
            total, per_fn = score(self.reward_fns, texts, ro["answers"], **ctx)
        except RewardError as e:
            raise TrainingError(f"step {self.step}: {e}. Fix it, then continue from the last checkpoint with "
                                "--resume auto") from None
        rewards = torch.tensor(total, dtype=torch.float32)
        acc = per_fn.get("accuracy") or accuracy_reward(texts, ro["answers"], **ctx)
        adv = group_advantages(rewards, self.cfg.rollout.num_generations, self.cfg.loss.scale_rewards,
                               self.cfg.loss.adv_eps)
        return {"rewards": rewards, "per_fn": per_fn, "accuracy": acc, "advantages": adv, "texts": texts,
                "group_idx": list(ro["idx"]), "group_keeps": list(ro["keeps"])}

    def _micro_batches(self, rows: list) -> list:
        m = self.cfg.optim.micro_batch_size
        return [rows[i:i + m] for i in range(0, len(rows), m)]

    @torch.no_grad()
    def _logprobs_no_grad(self, model, ro, micro):
        out = []
        for mb in micro:
            batch = collate([ro["prompts"][i] for i in mb], [ro["completions"][i] for i in mb],
                            self.tok.pad_token_id, self.device)
            with self._autocast():
                lp, _ = self._completion_logprobs(model, batch, with_entropy=False)
            out.append(lp.float())
        return out

    def update(self, ro: dict, sc: dict) -> dict:
        c = self.cfg
        N = len(ro["completions"])
        splits = np.array_split(np.arange(N), c.optim.mini_batches)
        minis = [[int(i) for i in s] for s in splits if len(s)]
        micro_of = [self._micro_batches(mb) for mb in minis]
        stats = {"time_reference": 0.0}
        t0 = time.perf_counter()
        need_old = self.updates_per_step > 1
        old = [self._logprobs_no_grad(self.model, ro, mic) for mic in micro_of] if need_old else None
        ref = None
        if self.ref is not None:
            t1 = time.perf_counter()
            ref = [self._logprobs_no_grad(self.ref, ro, mic) for mic in micro_of]
            stats["time_reference"] = time.perf_counter() - t1
        t_update = time.perf_counter()
        sums = {"loss": 0.0, "tokens": 0, "clipped": 0.0, "kl": 0.0, "entropy": 0.0, "grad_norm": [], "skipped": 0,
                "hint_nll": 0.0, "hint_batches": 0}
        self.model.train()
        for it in range(c.loss.num_iterations):
            for m, (mb, micro) in enumerate(zip(minis, micro_of)):
                n_tokens, n_seqs = self._normalizers(ro, mb)
                self.optimizer.zero_grad(set_to_none=True)
                loss_total = 0.0
                for j, rows in enumerate(micro):
                    # the hint loss rides on the last micro batch: one forward/backward per micro batch,
                    # as every backend (DeepSpeed's gradient accumulation included) expects
                    hint = self._hint_rows(ro, mb) if c.loss.hint_loss and j == len(micro) - 1 else ([], [])
                    loss, st = self._micro_loss(ro, sc, rows, hint, n_tokens, n_seqs,
                                                old[m][j] if old is not None else None,
                                                ref[m][j] if ref is not None else None)
                    self._backward(loss)
                    loss_total += loss.item()
                    if it == 0:
                        sums["tokens"] += st["tokens"]
                        sums["clipped"] += st["clipped_tokens"].item()
                        sums["kl"] += st.get("kl_sum", torch.tensor(0.0)).item()
                        sums["entropy"] += st["entropy_sum"].item() if "entropy_sum" in st else 0.0
                        sums["hint_nll"] += st.get("hint_nll", 0.0)
                        sums["hint_batches"] += "hint_nll" in st
                grad_norm = self._clip_and_norm()
                if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    sums["skipped"] += 1
                    self.log(f"[rtpo] step {self.step}: non-finite loss ({loss_total}) or grad norm ({grad_norm}); "
                             "update skipped")
                else:
                    self._optimizer_step()
                sums["loss"] += loss_total
                sums["grad_norm"].append(grad_norm)
        tok = max(sums["tokens"], 1)
        stats.update({
            "loss": sums["loss"] / self.updates_per_step, "grad_norm": float(np.mean(sums["grad_norm"])),
            "clip_frac": sums["clipped"] / tok, "kl": sums["kl"] / tok if c.loss.beta > 0 else None,
            "entropy": sums["entropy"] / tok, "skipped_updates": sums["skipped"],
            "hint_nll": sums["hint_nll"] / sums["hint_batches"] if sums["hint_batches"] else None,
            "time_update": time.perf_counter() - t_update, "time_old_logprobs": t_update - t0 - stats["time_reference"],
        })
        return stats

    def _micro_loss(self, ro, sc, rows, hint, n_tokens, n_seqs, old_lp, ref_lp):
        """Loss of one micro batch: the policy-gradient loss of `rows`, plus loss.hint_loss times the
        mean negative log-likelihood of the hint targets `hint` = (contexts, targets), computed in
        the same forward as extra rows (they never enter the policy-gradient terms)."""
        c, n = self.cfg, len(rows)
        comps = [ro["completions"][i] for i in rows]
        batch = collate([ro["prompts"][i] for i in rows] + hint[0], comps + hint[1], self.tok.pad_token_id,
                        self.device)
        with self._autocast():
            logp_all, ent_all = self._completion_logprobs(self.model, batch)
        T = max(max((len(x) for x in comps), default=0), 1)  # the policy rows' width (= old/ref passes')
        logp, mask = logp_all[:n, :T], batch["completion_mask"][:n, :T]
        loss, st = policy_loss(
            logp.float(), old_lp[:, :T] if old_lp is not None else logp.detach(),
            sc["advantages"][rows].to(self.device), mask, loss_type=c.loss.loss_type, eps_low=c.loss.epsilon_low,
            eps_high=c.loss.epsilon_high, beta=c.loss.beta, ref_logp=ref_lp[:, :T] if ref_lp is not None else None,
            entropy=ent_all[:n, :T].float() if ent_all is not None else None, entropy_coef=c.loss.entropy_coef,
            n_seqs=n_seqs, n_tokens=n_tokens, max_len=c.rollout.max_new_tokens)
        st["tokens"] = int(mask.sum().item())
        if hint[0]:
            nll = hint_nll(logp_all[n:].float(), batch["completion_mask"][n:])
            loss = loss + c.loss.hint_loss * nll
            st["hint_nll"] = nll.item()
        return loss, st

    def _hint_rows(self, ro, rows) -> tuple[list, list]:
        """(contexts, targets) of the hint loss for the groups that start in `rows` and carry a hint."""
        G = self.cfg.rollout.num_generations
        pairs = [ro["hint_targets"][i // G] for i in rows if i % G == 0]
        pairs = [(ctx, tgt) for ctx, tgt in pairs if tgt]
        return [p for p, _ in pairs], [t for _, t in pairs]

    def _completion_logprobs(self, model, batch, with_entropy=True):
        return completion_logprobs(model, batch, self.cfg.rollout.temperature, with_entropy=with_entropy)

    def _normalizers(self, ro, rows) -> tuple:
        """(completion tokens, sequences) of the update that `rows` belong to: the loss normalisers.
        A data-parallel subclass returns the counts over all processes."""
        return sum(len(ro["completions"][i]) for i in rows), len(rows)

    def _backward(self, loss):
        loss.backward()

    def _clip_and_norm(self) -> float:
        mgn = self.cfg.optim.max_grad_norm
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), mgn if mgn > 0 else float("inf")))

    def _optimizer_step(self):
        self.optimizer.step()
        self.scheduler.step()

    def train_step(self, step: int) -> dict:
        t0 = time.perf_counter()
        ro = self.rollout(step)
        t1 = time.perf_counter()
        sc = self.score(ro)
        t2 = time.perf_counter()
        up = self.update(ro, sc)
        G = self.cfg.rollout.num_generations
        acc = float(np.mean(sc["accuracy"]))
        self.curriculum.observe(step, acc)
        per_group = torch.tensor(sc["accuracy"], dtype=torch.float32).view(-1, G)
        # an example's own keep follows the rows that carried its hint (all rows if dropout took them all)
        hinted = per_group[:, G - ro["hinted_rows"]:] if ro["hinted_rows"] else per_group
        self.curriculum.observe_examples(sc["group_idx"], sc["group_keeps"], hinted.mean(1).tolist())
        all_wrong, all_right = group_outcomes(per_group)
        comp_lens = [len(x) for x in ro["completions"]]
        row = {
            "step": step, "keep": ro["keep"], "injected_tokens": float(np.mean(ro["injected"])),
            "mean_example_keep": float(np.mean(sc["group_keeps"])),
            "completion_tokens": float(np.mean(comp_lens)),
            "reasoning_tokens": float(np.mean([reasoning_length(x, self.close_ids) for x in ro["completions"]])),
            "reward": float(sc["rewards"].mean()), "reward_std": float(sc["rewards"].std()),
            "accuracy": acc, "zero_var_groups": zero_variance_fraction(sc["rewards"], G),
            "all_wrong_groups": all_wrong, "all_right_groups": all_right,
            "truncated_completions": float(np.mean([r == "length" for r in ro["finish_reasons"]])),
        }
        for name, vals in sc["per_fn"].items():
            row[f"reward/{name}"] = float(np.mean(vals))
        row.update({k: v for k, v in up.items()})
        row["lr"] = self.scheduler.get_last_lr()[0]
        row.update({"time_rollout": t1 - t0, "time_scoring": t2 - t1, "time_step": time.perf_counter() - t0})
        return row

    # --- evaluation ----------------------------------------------------------------------------
    def greedy_completions(self, prompts: list) -> tuple:
        """Greedy completions (eval settings, in eval.batch_size chunks) -> (token lists, finish reasons)."""
        e = self.cfg.eval
        sampling = SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=0.0, eos_token_ids=self.eos_ids,
                                  stop_strings=tuple(self.cfg.rollout.stop_strings), pad_token_id=self.tok.pad_token_id)
        comps, reasons = [], []
        for i in range(0, len(prompts), e.batch_size):
            out = self._generate(prompts[i:i + e.batch_size], sampling, 1)
            comps += out.completions
            reasons += out.finish_reasons
        return comps, reasons

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy, NO hint (the prompts a user would send), on the held-out rows."""
        e = self.cfg.eval
        encs, rows = self.eval_enc[: e.num_examples], self.eval_rows[: e.num_examples]
        if not encs:
            return {}
        comps, reasons = self.greedy_completions([self.builder.build(enc, 0.0)[0] for enc in encs])
        texts = [self._decode(x) for x in comps]
        answers = [r.answer for r in rows]
        kw = dict(think_open=self.cfg.curriculum.think_open, think_close=self.cfg.curriculum.think_close)
        return {
            "eval/accuracy": float(np.mean(accuracy_reward(texts, answers, **kw))),
            "eval/format": float(np.mean(format_reward(texts, answers, finish_reasons=reasons, **kw))),
            "eval/reasoning_tokens": float(np.mean([reasoning_length(x, self.close_ids) for x in comps])),
            "eval/completion_tokens": float(np.mean([len(x) for x in comps])),
        }

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "curriculum": self.curriculum.state_dict(), "generator": self.gen.get_state(),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "consecutive_skips": self.consecutive_skips, "skipped_total": self.skipped_total,
            "config": self.cfg.to_dict(),
        }

    def _write_checkpoint(self, tmp: str) -> None:
        self.model.save_pretrained(tmp)
        self.tok.save_pretrained(tmp)
        ckpt.save_state(tmp, self.state_dict())

    def save(self) -> str:
        path = ckpt.save_checkpoint(self.out, self.step, self._write_checkpoint, self.cfg.checkpoint.keep_last)
        self.log(f"[rtpo] checkpoint saved: {path}")
        return path

    def _load_state(self, path: str) -> None:
        st = ckpt.load_state(path)
        self.step = st["step"]
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.curriculum.load_state_dict(st["curriculum"])
        self.gen.set_state(st["generator"])
        random.setstate(st["rng"]["python"])
        np.random.set_state(st["rng"]["numpy"])
        torch.set_rng_state(st["rng"]["torch"])
        if st["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        self.consecutive_skips = st["consecutive_skips"]
        self.skipped_total = st["skipped_total"]

    # --- the loop ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop_signal = signal.Signals(signum).name

    def train(self) -> dict:
        from tqdm.auto import tqdm

        c = self.cfg
        os.makedirs(self.out, exist_ok=True)
        save_config(c, os.path.join(self.out, "config.json"))
        metrics = MetricsLog(os.path.join(self.out, "metrics.jsonl"), resume_step=self.step if self.resume_from else None)
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
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.2f}", keep=f"{row['keep']:.2f}",
                                wrong=f"{row['all_wrong_groups']:.2f}", right=f"{row['all_right_groups']:.2f}",
                                len=f"{row['completion_tokens']:.0f}", refresh=False)
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
                last_eval = final
            path = self.save()
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        summary = {"steps": self.step, "checkpoint": path, "wall_seconds": time.perf_counter() - t_start,
                   "eval_before": {k: v for k, v in (first_eval or {}).items() if k.startswith("eval/")},
                   "eval_after": {k: v for k, v in (last_eval or {}).items() if k.startswith("eval/")},
                   "skipped_updates": self.skipped_total,
                   "truncated_traces": {"train": self.train_truncated, "eval": self.eval_truncated},
                   "dropped_rows": {"train": self.train_dropped, "eval": self.eval_dropped}}
        if c.log.plot:
            png = plot_metrics(os.path.join(self.out, "metrics.jsonl"), os.path.join(self.out, "curves.png"))
            self.log(f"[rtpo] plot: {png}" if png else "[rtpo] matplotlib not installed: no plot "
                     "(pip install 'rtpo[plot]')")
        with open(os.path.join(self.out, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
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


def _as_list(x):
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
