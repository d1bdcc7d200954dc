"""Blockwise fused linear -> log-prob / entropy in pure torch (no [N, V] tensor ever exists).

Per token, with z = (h W^T + b) / T computed in float32 whatever the input dtype:

    lse  = logsumexp(z)                                   saved for backward, [N]
    logp = z[t] - lse
    ent  = lse - sum_v p_v z_v = -sum_v p_v log p_v       saved for backward, [N]   (p = softmax(z))

Work is done in [C, Vc] blocks (C tokens x Vc vocab entries). Forward keeps running per-token
statistics across the vocab blocks of a token chunk (online log-sum-exp, as in the Triton kernel):

    m = max z so far,  s = sum exp(z - m),  a = sum exp(z - m) (z - m),  zt = z[t]
    lse = m + log s,   ent = log s - a / s        (relative to m: no large-number cancellation)

Backward recomputes each block's logits from (h, W, b) and the saved lse / ent; with incoming
g = dL/dlogp and e = dL/dent (either may be None = that output is unused):

    dL/dz_v = g (1[v = t] - p_v) - e p_v (log p_v + ent)
      (entropy: d(-sum p log p)/dz_v = -p_v (log p_v + 1) + p_v sum_u p_u (log p_u + 1) = -p_v (log p_v + ent))
    dlogits = dL/dz / T;  dh += dlogits W[v-block];  dW[v-block] += dlogits^T h;  db[v-block] += sum dlogits

Memory is O(N + C*Vc + V*H) instead of O(N*V); the price is one extra GEMM (the recompute).
Default blocks: C = min(N, 16384) tokens and Vc = 2**26 / C vocab (one block's float32 logits
<= 256 MiB). A large C means the float32 [V, H] weight-grad accumulator is written ~once instead of
read-modified-written once per token chunk, and all GEMMs have big M/N/K.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .reference import compute_dtype

BLOCK_ELEMENTS = 1 << 26    # float32 logits per [C, Vc] block: 256 MiB; a block holds ~2 such buffers
BLOCK_ELEMENTS_CPU = 1 << 22  # 16 MiB on CPU: caches favour small blocks (benchmarks/bench_logprobs.py: 4096-wide
                              # vocab blocks were both faster and ~5x leaner than 256 MiB ones at V = 151k)
MIN_VOCAB_CHUNK = 4096      # the default token chunk keeps Vc >= this, so GEMMs stay wide


def default_chunk_size(vocab_size: int, budget: int = BLOCK_ELEMENTS) -> int:
    """Default tokens per chunk (16384 on GPU, 1024 on CPU for real vocabularies); the vocab chunk
    then fills the block budget."""
    return max(1, budget // max(1, min(vocab_size, MIN_VOCAB_CHUNK)))


def block_shape(N: int, V: int, chunk_size: Optional[int] = None,
                vocab_chunk_size: Optional[int] = None, budget: int = BLOCK_ELEMENTS) -> Tuple[int, int]:
    """(C, Vc): tokens and vocab entries per block, with C * Vc <= budget unless both are forced."""
    C = max(1, min(N, int(chunk_size or default_chunk_size(V, budget))))
    Vc = max(1, min(V, int(vocab_chunk_size or max(1, budget // C))))
    return C, Vc


def block_logits(h: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    """z = (h W^T + b) / T for one block, in W's (compute) dtype; a fresh tensor we may modify in place."""
    h = h.to(W.dtype)
    z = torch.addmm(b, h, W.T) if b is not None else h @ W.T
    if temperature != 1.0:
        z.div_(temperature)       # divide (not multiply by 1/T), exactly like the naive path
    return z


def merge_stats(m1, s1, a1, m2, s2, a2):
    """Combine online-LSE statistics of two disjoint vocab ranges (each (m, s, a) relative to its own m):
    M = max(m1, m2);  s = sum_i e^(m_i - M) s_i;  a = sum_i e^(m_i - M) (a_i + (m_i - M) s_i)."""
    M = torch.maximum(m1, m2)
    w1, w2 = torch.exp(m1 - M), torch.exp(m2 - M)
    s = w1 * s1 + w2 * s2
    a = None if a1 is None else w1 * (a1 + (m1 - M) * s1) + w2 * (a2 + (m2 - M) * s2)
    return M, s, a


def dlogits_(z: torch.Tensor, local_targets: torch.Tensor, lse: torch.Tensor, ent: Optional[torch.Tensor],
             g_logp: Optional[torch.Tensor], g_ent: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    """Turn a block's logits z [C, Vc] into dL/dlogits in place (formula in the module docstring), as
        dlogits = p (a log p + c) + onehot(t) g / T,   a = -e / T,   c = -(g + e ent) / T
    so per-row coefficients absorb the sign and 1/T. local_targets = t - v0 (outside [0, Vc): no one-hot)."""
    inv_t = 1.0 / temperature
    logp = z.sub_(lse[:, None])                                  # z now holds log p
    p = logp.exp()
    if g_ent is not None:
        c = g_ent * ent if g_logp is None else g_logp + g_ent * ent
        dz = logp.mul_((-inv_t * g_ent)[:, None]).add_((-inv_t * c)[:, None]).mul_(p)
        del p
    else:
        dz = p.mul_((-inv_t * g_logp)[:, None])
    if g_logp is not None:
        hit = (local_targets >= 0) & (local_targets < z.shape[1])
        idx = local_targets.clamp(0, z.shape[1] - 1)[:, None]
        dz.scatter_add_(1, idx, torch.where(hit, inv_t * g_logp, 0.0)[:, None])
    return dz


def blockwise_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       needs: Tuple[bool, bool, bool], C: int, Vc: int, cdt: torch.dtype,
                       block_dlogits: Callable):
    """Shared by the torch and Triton paths: for each [C, Vc] block get dL/dlogits from
    block_dlogits(s, e, v0, v1, h_block, W_block) and accumulate dh, dW, db in `cdt` (float32);
    grads are returned in the input dtypes. dW[v-block] is touched once per token chunk."""
    need_h, need_w, need_b = needs
    N, H = hidden.shape
    V = weight.shape[0]
    dh = torch.empty_like(hidden) if need_h else None
    dW = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
    db = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if need_b else None
    for s in range(0, N, C):
        e = min(s + C, N)
        h_c = hidden[s:e].to(cdt)
        dh_c = torch.zeros(e - s, H, dtype=cdt, device=hidden.device) if need_h and Vc < V else None
        for v0 in range(0, V, Vc):
            v1 = min(v0 + Vc, V)
            W_v = weight[v0:v1].to(cdt)          # upcasts one vocab slice at a time, never all of W
            dz = block_dlogits(s, e, v0, v1, h_c, W_v)
            if need_h:
                if dh_c is None:
                    dh[s:e].copy_(dz @ W_v)      # copy_ casts to the input dtype
                else:
                    dh_c.addmm_(dz, W_v)
            if need_w:
                dW[v0:v1].addmm_(dz.T, h_c)
            if need_b:
                db[v0:v1].add_(dz.sum(0))
            del dz
        if dh_c is not None:
            dh[s:e].copy_(dh_c)
    return (dh, dW.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None)


class ChunkedLinearLogprobs(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, targets [N]) -> (logp [N], ent [N] | None)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, C: int, Vc: int, with_entropy: bool):
        cdt = compute_dtype(hidden, weight, bias)
        N, V = hidden.shape[0], weight.shape[0]
        lse = torch.empty(N, dtype=cdt, device=hidden.device)
        logp = torch.empty_like(lse)
        ent = torch.empty_like(lse) if with_entropy else None
        for s in range(0, N, C):
            e = min(s + C, N)
            h_c, t_c = hidden[s:e].to(cdt), targets[s:e]        # upcast once per token chunk
            m = sum_ex = a = zt = None
            for v0 in range(0, V, Vc):
                v1 = min(v0 + Vc, V)
                z = block_logits(h_c, weight[v0:v1].to(cdt), bias[v0:v1].to(cdt) if bias is not None else None,
                                 temperature)
                local = t_c - v0
                hit = (local >= 0) & (local < v1 - v0)
                zt_j = torch.where(hit, z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1), 0.0)
                m_j = z.amax(dim=-1)
                z.sub_(m_j[:, None])                                 # z - m <= 0: exp cannot overflow
                if with_entropy:
                    ex = z.exp()
                    s_j, a_j = ex.sum(-1), ex.mul_(z).sum(-1)        # a = sum e^(z-m) (z-m)
                    del ex
                else:
                    s_j, a_j = z.exp_().sum(-1), None                # one [C, Vc] buffer suffices
                del z
                if m is None:
                    m, sum_ex, a, zt = m_j, s_j, a_j, zt_j
                else:
                    m, sum_ex, a = merge_stats(m, sum_ex, a, m_j, s_j, a_j)
                    zt = zt + zt_j
            log_s = sum_ex.log()
            lse[s:e] = m + log_s
            logp[s:e] = zt - lse[s:e]
            if with_entropy:
                ent[s:e] = log_s - a / sum_ex
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.blocks = temperature, (C, Vc)
        ctx.set_materialize_grads(False)         # an unused output's grad arrives as None: skip its term
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        nones = (None,) * 5
        if g_logp is None and g_ent is None:
            return (None, None, None) + nones
        T, cdt = ctx.temperature, lse.dtype

        def block_dlogits(s, e, v0, v1, h_c, W_v):
            z = block_logits(h_c, W_v, bias[v0:v1].to(cdt) if bias is not None else None, T)
            return dlogits_(z, targets[s:e] - v0, lse[s:e], ent[s:e] if g_ent is not None else None,
                            g_logp[s:e] if g_logp is not None else None,
                            g_ent[s:e] if g_ent is not None else None, T)

        grads = blockwise_backward(hidden, weight, bias, ctx.needs_input_grad[:3], *ctx.blocks, cdt, block_dlogits)
        return grads + nones


def chunked_core(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 bias: Optional[torch.Tensor], temperature: float, with_entropy: bool,
                 chunk_size: Optional[int] = None,
                 vocab_chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Flat entry point: hidden [N, H], targets [N] -> (logp [N], ent [N] or None).
    chunk_size: tokens per block; vocab_chunk_size: vocab entries per block (default: fill BLOCK_ELEMENTS)."""
    budget = BLOCK_ELEMENTS if hidden.is_cuda else BLOCK_ELEMENTS_CPU
    C, Vc = block_shape(hidden.shape[0], weight.shape[0], chunk_size, vocab_chunk_size, budget)
    return ChunkedLinearLogprobs.apply(hidden, weight, bias, targets, temperature, C, Vc, with_entropy)
