"""The clipped policy-gradient loss with a k3 KL penalty, aggregated by `loss_type`.

Per completion token t of completion i, with importance ratio rho_it (`importance`):

    L_it  = -w_it * min(rho_it * A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_it
    KL_it = exp(ref - logp) - (ref - logp) - 1          (k3 estimator, >= 0)

    token    (PPO / GRPO):  rho_it = exp(logp_it - old_it)
    sequence (GSPO):        rho_it = sg[s_i] * exp(logp_it - sg[logp_it]),
                            s_i = exp(mean over i's tokens of (logp - old))
                            (value s_i on every token of i; gradient s_i * grad logp_it: with
                            loss_type grpo this is GSPO's sequence objective exactly)

w_it = 1, or with truncated importance sampling (tis_cap > 0) the detached weight
min(pi_old / pi_rollout, tis_cap) per token (`tis_level` token) or per sequence (the product of
the token ratios, `sequence`), where pi_rollout is the sampler's own probability of the token:
it corrects for rollout numerics (bf16, compiled decode) that differ from the training forward.

Aggregations take their normalizers as arguments, so that a rollout batch split into micro
batches sums to exactly the loss of the whole batch (gradient accumulation stays exact).
"""

from __future__ import annotations

import math

import torch


def _masked(x, mask):
    # where, not multiply: padding holding inf/nan must not leak into the sum (inf * 0 = nan)
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def agg_grpo(per_token, mask, n_seqs, n_tokens, max_len):
    """mean over each sequence's tokens, then mean over the n_seqs sequences."""
    per_seq = _masked(per_token, mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / n_seqs


def agg_dapo(per_token, mask, n_seqs, n_tokens, max_len):
    """token mean: sum over all tokens / n_tokens (the batch's completion tokens)."""
    return _masked(per_token, mask).sum() / max(n_tokens, 1)


def agg_dr_grpo(per_token, mask, n_seqs, n_tokens, max_len):
    """Dr. GRPO: sum over all tokens / (n_seqs * max_completion_length)."""
    return _masked(per_token, mask).sum() / (n_seqs * max_len)


LOSS_TYPES = {"grpo": agg_grpo, "dapo": agg_dapo, "dr_grpo": agg_dr_grpo}


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(pi || ref) per token, k3 estimator: exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def token_ratio(logp, old_logp, mask):
    """PPO / GRPO: rho_it = exp(logp_it - old_it), one ratio per token."""
    return torch.exp(logp - old_logp)


def sequence_ratio(logp, old_logp, mask):
    """GSPO (Zheng et al. 2025): s_i = exp(mean_t (logp_it - old_it)) over sequence i's masked tokens,
    in the token-level gradient form s_it = sg[s_i] * exp(logp_it - sg[logp_it]): every token of i
    carries the value s_i, and d s_it / d logp_it = s_i. Padding never enters s_i."""
    diff = _masked(logp - old_logp, mask)
    s = torch.exp(diff.sum(-1) / mask.sum(-1).clamp(min=1)).detach()
    lp = _masked(logp, mask)
    return s.unsqueeze(-1) * torch.exp(lp - lp.detach())


IMPORTANCE = {"token": token_ratio, "sequence": sequence_ratio}


def _tis_log_ratio(old_logp, rollout_logp, mask, level):
    d = _masked(old_logp.detach() - rollout_logp.detach(), mask)
    if level == "sequence":
        return d.sum(-1, keepdim=True).expand_as(d)
    if level != "token":
        raise ValueError(f"tis level must be 'token' or 'sequence', got {level!r}")
    return d


def tis_weights(old_logp, rollout_logp, mask, cap: float, level: str = "token"):
    """Truncated importance sampling weights (detached), [B, T]: min(pi_old / pi_rollout, cap) per
    token, or per sequence min(prod_t pi_old / pi_rollout, cap) broadcast to its tokens. Computed in
    log space and capped before the exp, so a long sequence cannot overflow."""
    return torch.exp(torch.clamp(_tis_log_ratio(old_logp, rollout_logp, mask, level), max=math.log(cap)))


def clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high, mask=None, importance="token"):
    """-min(rho * A, clip(rho) * A) per token, and where the clip is active (for the clip fraction);
    rho from the `importance` registry (token: PPO/GRPO, sequence: GSPO)."""
    ratio = IMPORTANCE[importance](logp, old_logp, torch.ones_like(logp) if mask is None else mask)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    return -torch.min(unclipped, clipped), (clipped < unclipped)


def policy_loss(logp, old_logp, advantages, mask, *, loss_type="dapo", eps_low=0.2, eps_high=0.2,
                beta=0.0, ref_logp=None, entropy=None, entropy_coef=0.0,
                n_seqs=None, n_tokens=None, max_len=None, importance="token",
                rollout_logp=None, tis_cap=0.0, tis_level="token"):
    """logp/old_logp/ref_logp/entropy/mask: [B, T] (mask 1 on generated tokens), advantages [B].
    importance: "token" or "sequence" (GSPO). rollout_logp [B, T] with tis_cap > 0: truncated
    importance sampling of the policy-gradient term (not the KL) against the sampler's log-probs.

    n_seqs / n_tokens / max_len are the normalizers of the whole (mini)batch this micro batch is
    part of; they default to this tensor's own. Returns (loss, stats) where stats hold sums over
    the masked tokens (clipped, kl, entropy) for exact averaging across micro batches.
    """
    mask = mask.to(logp.dtype)
    n_seqs = logp.shape[0] if n_seqs is None else n_seqs
    n_tokens = int(mask.sum().item()) if n_tokens is None else n_tokens
    max_len = logp.shape[1] if max_len is None else max_len
    per_token, is_clipped = clipped_surrogate(logp, old_logp.detach(), advantages.detach(), eps_low, eps_high,
                                              mask=mask, importance=importance)
    stats = {"clipped_tokens": _masked(is_clipped.to(mask.dtype), mask).sum().detach()}
    if tis_cap > 0:
        if rollout_logp is None:
            raise ValueError("tis_cap > 0 needs rollout_logp (the sampler's log-probs)")
        w = tis_weights(old_logp, rollout_logp, mask, tis_cap, tis_level).to(per_token.dtype)
        per_token = per_token * w
        truncated = _tis_log_ratio(old_logp, rollout_logp, mask, tis_level) > math.log(tis_cap)
        gap = _masked((old_logp.detach() - rollout_logp.detach()).abs(), mask)
        stats.update(tis_weight_sum=_masked(w, mask).sum(), logp_gap_sum=gap.sum(),
                     tis_truncated_tokens=_masked(truncated.to(mask.dtype), mask).sum())
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = k3_kl(logp, ref_logp.detach())
        per_token = per_token + beta * kl
        stats["kl_sum"] = _masked(kl, mask).sum().detach()
    if entropy is not None:
        if entropy_coef:
            per_token = per_token - entropy_coef * entropy
        stats["entropy_sum"] = _masked(entropy.detach(), mask).sum()
    loss = LOSS_TYPES[loss_type](per_token, mask, n_seqs, n_tokens, max_len)
    return loss, stats


def hint_nll(logp: torch.Tensor, mask: torch.Tensor, n_tokens=None) -> torch.Tensor:
    """Negative log-likelihood of the injected hint tokens (UFT's supervised term):
    -sum(logp * mask) / n_tokens, n_tokens = sum(mask) unless given (the hint tokens of all processes,
    so that the processes' shares sum to the one-process loss); 0 when the mask is empty. Padding never
    contributes."""
    n = mask.float().sum().clamp(min=1.0) if n_tokens is None else max(float(n_tokens), 1.0)
    return -_masked(logp, mask).sum() / n


def hint_tokens_kept(hint_len: int, top: float) -> int:
    """How many of a row's hint_len injected tokens enter the policy loss (loss.hint_advantage):
    ceil(top * hint_len), all of them at top = 1, none of an empty hint."""
    return hint_len if top >= 1 else math.ceil(top * hint_len - 1e-9)


def hint_token_mask(mask: torch.Tensor, entropy: torch.Tensor, hint_lens: list, top: float) -> torch.Tensor:
    """Prefix-RFT's token choice: `mask` [B, T] of rows whose first hint_lens[b] positions are injected hint
    tokens, with only the hint_tokens_kept(h, top) highest-entropy of those left on (ties: the earlier token);
    the rest of the mask is unchanged. entropy [B, T] is read, never differentiated."""
    if top >= 1 or not any(hint_lens):
        return mask
    out = mask.clone()
    ent = entropy.detach()
    for b, h in enumerate(hint_lens):
        if h == 0:
            continue
        k = hint_tokens_kept(h, top)
        order = torch.sort(ent[b, :h].float(), descending=True, stable=True).indices
        drop = order[k:]
        out[b, drop] = 0
    return out
