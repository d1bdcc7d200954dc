"""The naive (materialising) linear -> log-prob / entropy path: the semantics every other path must match.

For each token n with last hidden state h_n [H], lm_head weight W [V, H], bias b [V] (optional),
target id t_n and sampling temperature T:

    z_n     = (W h_n + b) / T                  logits of the distribution the rollout sampled from
    lse_n   = logsumexp(z_n)
    logp_n  = z_n[t_n] - lse_n                 log p(target)
    ent_n   = lse_n - sum_v p_nv z_nv          = -sum_v p_nv log p_nv,  p_n = softmax(z_n)

This path builds the full [N, V] logits (and a log-softmax of the same size) in the compute dtype,
so it is only for small problems and as the reference in tests and benchmarks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float32 for any input dtype (bf16/fp16/fp32), float64 if an input is float64 (used by gradcheck)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def naive_core(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               bias: Optional[torch.Tensor], temperature: float,
               with_entropy: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """hidden [N, H], weight [V, H], targets [N] -> (logp [N], ent [N] or None); plain autograd."""
    cdt = compute_dtype(hidden, weight, bias)
    z = hidden.to(cdt) @ weight.to(cdt).T                       # [N, V]: the tensor the other paths avoid
    if bias is not None:
        z = z + bias.to(cdt)
    if temperature != 1.0:
        z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)                     # another [N, V]
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, ent
