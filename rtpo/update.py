"""The update stage: frozen log-probs (old policy, reference), micro-batch losses, the backend's
backward / step, and the step's update metrics.

loss.num_iterations passes over the step's rows, each in optim.mini_batches optimizer updates (the
backend's `plan`) accumulated over micro batches (the backend's `micro_batches`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from rtpo.logprobs import make_batch, micro_batches, row_tokens
from rtpo.curriculum import sft_weight
from rtpo.losses import hint_nll, hint_token_mask, hint_tokens_kept, policy_loss
from rtpo.metrics import reduce_as
from rtpo.stages import LossRows, Rollout, Rows, Scores, Supervised

reduce_as("sum", "loss", "hint_nll", "sft_nll", "fwd_tokens", "sup_tokens")  # each process holds its share of the global loss (hint NLL: global normaliser)
reduce_as("same", "grad_norm")  # the norm of the global gradient
reduce_as("max", "skipped_updates")
reduce_as("tokens", "clip_frac", "kl", "entropy", "tis_weight", "tis_truncated", "rollout_logp_gap")

_SUMS = ("tokens", "clipped_tokens", "kl_sum", "entropy_sum", "tis_weight_sum", "tis_truncated_tokens",
         "logp_gap_sum", "hint_nll", "sft_nll")


@dataclass(frozen=True)
class Normalizers:
    """The policy loss's normalisers of one optimizer update, summed over all processes: each process's
    loss is its share of the global loss (each supervised term carries its own: `Supervised.n_tokens`)."""
    tokens: int       # policy-loss tokens of the update's rows
    seqs: int         # its rows


def _costs(lr: LossRows, o):
    """rows -> each row's tokens as a packed batch holds them (a group's prompt once when shared)."""
    return lambda rows: row_tokens(lr.prompts, lr.completions, rows, share_prefix=o.packing and o.share_prefix)


class UpdateStats:
    """Sums of one step's updates -> its metrics (per-token means over the first pass's tokens)."""

    def __init__(self, time_old_logprobs: float, time_reference: float):
        self.t0, self.times = time.perf_counter(), {"time_old_logprobs": time_old_logprobs,
                                                    "time_reference": time_reference}
        self.sums = {k: 0.0 for k in _SUMS}
        self.sums.update(hint_batches=0, sft_batches=0, loss=0.0, fwd_tokens=0, sup_tokens=0)
        self.grad_norms, self.skipped = [], 0

    def add_micro(self, st: dict) -> None:
        for k in _SUMS:
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


class Updater:
    """Trains the policy on a scored rollout through the backend."""

    def __init__(self, run, backend, log=print):
        self.run, self.backend, self.comm, self.log = run, backend, backend.comm, log
        self.updates_per_step = run.cfg.loss.num_iterations * run.cfg.optim.mini_batches

    def update(self, ro: Rollout, sc: Scores) -> dict:
        """All the step's optimizer updates -> their metrics."""
        c = self.run.cfg
        lr = self.loss_rows(ro)
        micro_of = self.backend.plan(len(ro), _costs(lr, self.run.cfg.optim))
        minis = [sum(micro, []) for micro in micro_of]
        t0 = time.perf_counter()
        old = [self.frozen_logprobs(ro, lr, mic) for mic in micro_of] if self.updates_per_step > 1 else None
        t1 = time.perf_counter()
        ref = [self.frozen_logprobs(ro, lr, mic, ref=True) for mic in micro_of] if self.run.ref is not None else None
        stats = UpdateStats(time_old_logprobs=t1 - t0, time_reference=time.perf_counter() - t1)
        self.run.model.train()
        for it in range(c.loss.num_iterations):
            for m, (mb, micro) in enumerate(zip(minis, micro_of)):
                loss, grad_norm = self._one_update(ro, lr, sc, mb, micro, old[m] if old else None,
                                                   ref[m] if ref else None, stats, first=it == 0)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    self.log(f"[rtpo] step {ro.step}: non-finite loss ({loss}) or grad norm ({grad_norm}); "
                             "update skipped")
                stats.add_update(loss, grad_norm)
        return stats.metrics(self.updates_per_step, kl=c.loss.beta > 0, tis=c.loss.tis_cap > 0)

    def _one_update(self, ro, lr, sc, mb, micro, old, ref, stats, first: bool) -> tuple[float, float]:
        """One optimizer update over mini batch `mb` (cut into `micro`) -> (its loss, the grad norm). The
        supervised rows ride on the last micro batch: one forward/backward per micro batch, as every backend
        (DeepSpeed's gradient accumulation included) expects."""
        own = sum(len(lr.completions[i]) - lr.hint_lens[i] + lr.hint_kept[i] for i in mb)  # hint: kept tokens only
        n_tokens, n_seqs = self.comm.sum([own, len(mb)])
        norm = Normalizers(int(n_tokens), int(n_seqs))
        sup = self.supervised(ro, mb)
        self.backend.zero_grad()
        loss_total = 0.0
        for j, rows in enumerate(micro):
            last = j == len(micro) - 1
            loss, st = self.micro_loss(ro.take(rows, lr), sc.advantages[rows], norm, old[j] if old else None,
                                       ref[j] if ref else None, sup=sup if last else [])
            self.backend.backward(loss)
            loss_total += loss.item()
            if first:
                stats.add_micro(st)
            stats.add_tokens(st["fwd_tokens"], st["sup_tokens"])
        return loss_total, self.backend.step(loss_finite=math.isfinite(loss_total))

    def loss_rows(self, ro: Rollout) -> LossRows:
        """The rows as the update's log-prob passes see them (stages.LossRows). loss.hint_advantage: a
        hinted row's injected hint moves from its prompt to the start of its completion."""
        top = self.run.cfg.loss.hint_top_entropy
        if not self.run.cfg.loss.hint_advantage:
            return LossRows(ro.prompts, ro.completions, [0] * len(ro), [0] * len(ro))
        G, prompts, comps, lens = ro.G, [], [], []
        row_prompts, row_keep, targets = ro.row_prompts, ro.row_keep, ro.hint_targets
        for i in range(len(ro)):
            context, hint = targets[i // G]
            hinted = row_keep[i] > 0 and bool(hint)
            prompts.append(context if hinted else row_prompts[i].ids)  # a group's contexts are one list: shared prefix
            comps.append(hint + ro.completions[i] if hinted else ro.completions[i])
            lens.append(len(hint) if hinted else 0)
        return LossRows(prompts, comps, lens, [hint_tokens_kept(h, top) for h in lens])

    def supervised(self, ro: Rollout, rows: list) -> list:
        """The update's supervised terms for the groups that start in `rows`: the hint loss (groups that carry
        a hint: the injected text after its context) and the SFT loss (every group: the whole response after
        the hint-free prompt), each with its weight at the rollout's step and its global token count."""
        c, G = self.run.cfg, ro.G
        starts = [i for i in rows if i % G == 0]
        terms = []
        if c.loss.hint_loss:
            hinted = [i for i in starts if ro.hinted[i // G].hint_target]
            terms.append(Supervised("hint", [ro.hinted[i // G].hint_context for i in hinted],
                                    [ro.hinted[i // G].hint_target for i in hinted], ro.images_of(hinted) or [],
                                    c.loss.hint_loss))
        w = sft_weight(ro.step, c.loss.sft_loss, c.loss.sft_decay, c.curriculum, c.run.max_steps)
        if c.loss.sft_loss and w > 0:
            terms.append(Supervised("sft", [ro.sft_targets[i // G][0] for i in starts],
                                    [ro.sft_targets[i // G][1] for i in starts], ro.images_of(starts) or [], w))
        counts = self.comm.sum([sum(len(x) for x in t.targets) for t in terms]) if terms else []
        for t, n in zip(terms, counts):
            t.n_tokens = int(n)
        return [t for t in terms if t.n_tokens]

    def micro_batches(self, ro: Rollout, rows: list) -> list:
        """Mini batch `rows` cut into micro batches as the backend's plan cuts them."""
        o = self.run.cfg.optim
        return micro_batches(rows, _costs(self.loss_rows(ro), o), o, self.backend.gas)

    def batch(self, prompts: list, completions: list, images=None) -> dict:
        """The log-prob batch of these rows (and their images, if any): packed, each distinct prompt once
        (optim.packing / share_prefix), or padded where the model cannot take a packed batch (rtpo.logprobs.make_batch)."""
        o, run = self.run.cfg.optim, self.run
        return make_batch(run.model, prompts, completions, run.tok.pad_token_id, run.device, packing=o.packing,
                          share_prefix=o.share_prefix, images=images)

    @torch.no_grad()
    def frozen_logprobs(self, ro: Rollout, lr: LossRows, micro: list, ref: bool = False) -> list:
        """Per micro batch, the log-probs of its rows (laid out as `lr`) under the policy as it is now (the
        old policy of the step's later updates) or under the reference."""
        out = []
        for mb in micro:
            v = ro.take(mb, lr)
            batch = self.batch(v.prompts, v.completions, images=v.images)
            with self.run.autocast():
                lp, _ = self.backend.logprobs(batch, ref=ref, with_entropy=False)
            out.append(lp.float())
        return out

    def micro_loss(self, rows: Rows, advantages: torch.Tensor, norm: Normalizers, old_lp=None, ref_lp=None,
                   sup: list = ()) -> tuple:
        """Loss of one micro batch: the policy-gradient loss of `rows`, plus each supervised term of `sup`
        (hint loss, SFT loss): its weight times the negative log-likelihood of its targets over the update's
        target tokens of all processes, computed in the same forward as extra rows (they never enter the
        policy-gradient terms)."""
        c, n, comps = self.run.cfg, len(rows), rows.completions
        prompts = rows.prompts + [x for t in sup for x in t.contexts]
        targets = comps + [x for t in sup for x in t.targets]
        images = None if rows.images is None else rows.images + [x for t in sup for x in t.images]
        batch = self.batch(prompts, targets, images=images)
        with self.run.autocast():
            logp_all, ent_all = self.backend.logprobs(batch)
        T = max(max((len(x) for x in comps), default=0), 1)  # the policy rows' width (= old/ref passes')
        logp, mask = logp_all[:n, :T], batch["completion_mask"][:n, :T]
        if any(rows.hint_lens):  # loss.hint_advantage: only the kept hint tokens (highest entropy) get the advantage
            mask = hint_token_mask(mask, ent_all[:n, :T], rows.hint_lens, c.loss.hint_top_entropy)
        loss, st = policy_loss(
            logp.float(), old_lp[:, :T] if old_lp is not None else logp.detach(),
            advantages.to(self.run.device), mask, loss_type=c.loss.loss_type, eps_low=c.loss.epsilon_low,
            eps_high=c.loss.epsilon_high, beta=c.loss.beta, ref_logp=ref_lp[:, :T] if ref_lp is not None else None,
            entropy=ent_all[:n, :T].float() if ent_all is not None else None, entropy_coef=c.loss.entropy_coef,
            n_seqs=norm.seqs, n_tokens=norm.tokens, max_len=c.rollout.max_new_tokens, importance=c.loss.importance,
            rollout_logp=self._rollout_logprobs(rows, T), tis_cap=c.loss.tis_cap, tis_level=c.loss.tis_level)
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

    def _rollout_logprobs(self, rows: Rows, T: int):
        """[len(rows), T] the sampler's log-probs of the rows' tokens (0 on padding); None without TIS."""
        if self.run.cfg.loss.tis_cap <= 0:
            return None
        out = torch.zeros((len(rows), T), dtype=torch.float32)
        for a, lps in enumerate(rows.rollout_logprobs):
            out[a, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
        return out.to(self.run.device)
