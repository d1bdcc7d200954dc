"""The clipped policy-gradient loss with a k3 KL penalty, aggregated by `loss_type`.

Per completion token t of completion i, with ratio rho = exp(logp - old_logp):

    L_it  = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_it
    KL_it = exp(ref - logp) - (ref - logp) - 1          (k3 estimator, >= 0)

Aggregations take their normalizers as arguments, so that a rollout batch split into micro
batches sums to exactly the loss of the whole batch (gradient accumulation stays exact).
"""

from __future__ import annotations

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


def clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high):
    """-min(rho * A, clip(rho) * A) per token, and where the clip is active (for the clip fraction)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    return -torch.min(unclipped, clipped), (clipped < unclipped)


def policy_loss(logp, old_logp, advantages, mask, *, loss_type="dapo", eps_low=0.2, eps_high=0.2,
                beta=0.0, ref_logp=None, entropy=None, entropy_coef=0.0,
                n_seqs=None, n_tokens=None, max_len=None):
    """logp/old_logp/ref_logp/entropy/mask: [B, T] (mask 1 on generated tokens), advantages [B].

    n_seqs / n_tokens / max_len are the normalizers of the whole (mini)batch this micro batch is
    part of; they default to this tensor's own. Returns (loss, stats) where stats hold sums over
    the masked tokens (clipped, kl, entropy) for exact averaging across micro batches.
    """
    mask = mask.to(logp.dtype)
    n_seqs = logp.shape[0] if n_seqs is None else n_seqs
    n_tokens = int(mask.sum().item()) if n_tokens is None else n_tokens
    max_len = logp.shape[1] if max_len is None else max_len
    per_token, is_clipped = clipped_surrogate(logp, old_logp.detach(), advantages.detach(), eps_low, eps_high)
    stats = {"clipped_tokens": _masked(is_clipped.to(mask.dtype), mask).sum().detach()}
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


def hint_nll(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the injected hint tokens (UFT's supervised term):
    -sum(logp * mask) / sum(mask); 0 when the mask is empty. Padding never contributes."""
    return -_masked(logp, mask).sum() / mask.float().sum().clamp(min=1.0)
