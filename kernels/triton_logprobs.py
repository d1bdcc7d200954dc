"""Triton path for the fused linear -> log-prob / entropy (same maths as kernels/logprobs.py).

Forward (`_fwd_kernel`): one program owns BLOCK_N tokens and a range of vocab tiles. For each
[BLOCK_N, BLOCK_V] tile it computes z = (h W^T + b) / T with tl.dot over BLOCK_H slices of H
(input dtype in, float32 accumulate), then folds the tile into running per-token statistics
(online log-sum-exp), so logits never leave registers:

    m  = running max of z                   s = sum_v exp(z_v - m)
    a  = sum_v exp(z_v - m) (z_v - m)       zt = z[t]
    on a new max m' : s <- s e^(m - m'),  a <- e^(m - m') (a + (m - m') s)

The vocab may be split across programs (grid axis 1) when there are few token blocks; the partial
(m, s, a, zt) are merged in torch. Finally lse = m + log s, logp = zt - lse,
ent = lse - E_p[z] = log s - a / s (computed relative to m, so no large-number cancellation).

Backward (`_dlogits_kernel`): per [C tokens, Vc vocab] block (same blocking as the torch path, via
logprobs.blockwise_backward), a 2-D grid of [BLOCK_N, BLOCK_V] tiles recomputes z with tl.dot and writes
dL/dlogits = [g (1[v = t] - p) - e p (log p + ent)] / T into one reused [C, Vc] float32 buffer;
dh += dlogits W and dW[block] += dlogits^T h are then cuBLAS GEMMs (fusing them would need a
[BLOCK_V, H] accumulator per program or atomics over every token block, both slower than a GEMM).
Mixed hidden/weight dtypes are upcast to float32 copies first (tl.dot needs one dtype).

Runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1 (correctness only, slow).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .logprobs import block_shape, blockwise_backward

try:  # triton is optional: without it kernels/__init__ falls back to the torch path
    import triton
    import triton.language as tl
    HAS_TRITON = True
    IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # ImportError, or a broken install raising something else at import time
    triton = tl = None
    HAS_TRITON = False
    IMPORT_ERROR = exc

# Tile sizes: sensible defaults, NOT tuned on hardware (tl.dot needs every dim >= 16 on GPUs).
BLOCK_N, BLOCK_V, BLOCK_H = 64, 128, 64
NUM_WARPS = 8


def _stages(h: torch.Tensor) -> int:
    """Software-pipeline depth: 3 stages of bf16 (64x64 + 128x64) tiles = 72 KiB of shared memory;
    fp32 tiles are twice as big, so 2 stages keep them within smaller GPUs' shared memory."""
    return 2 if h.element_size() >= 4 else 3


if HAS_TRITON:

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_temp,
                     HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
        """z tile [BLOCK_N, BLOCK_V] = (h[rows] W[cols]^T + b[cols]) / T, float32 accumulation."""
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        h_row = h_ptr + rows.to(tl.int64)[:, None] * stride_h     # int64: N*H or V*H may exceed 2**31
        w_row = w_ptr + cols.to(tl.int64)[:, None] * stride_w
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            h = tl.load(h_row + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_row + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST_DOT:  # interpreter only, see _operands
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        return acc * inv_temp

    @triton.jit
    def _fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, m_ptr, s_ptr, a_ptr, zt_ptr,
                    N, V, H, stride_h, stride_w, inv_temp, v_per_split,
                    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
        """Partial online-LSE statistics of tokens [pid_n*BLOCK_N, +BLOCK_N) over one vocab split."""
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        a = tl.zeros((BLOCK_N,), tl.float32)
        zt = tl.zeros((BLOCK_N,), tl.float32)
        v_start = split * v_per_split
        v_end = tl.minimum(v_start + v_per_split, V)
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_end
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_temp,
                             HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
            z = tl.where(col_ok[None, :], z, float("-inf"))      # padded columns carry no mass
            m_new = tl.maximum(m, tl.max(z, axis=1))             # finite: every tile has >= 1 real column
            alpha = tl.exp(m - m_new)                            # 0 on the first tile (m = -inf)
            e = tl.exp(z - m_new[:, None])
            if WITH_ENTROPY:
                # re-reference a from m to m_new (shift 0 on the first tile, where m = -inf and s = 0),
                # and zero z - m_new on padded columns: both avoid forming (-inf) * 0 = NaN
                a = alpha * (a + tl.where(s > 0, m - m_new, 0.0) * s)
                a += tl.sum(e * tl.where(col_ok[None, :], z - m_new[:, None], 0.0), axis=1)
            s = s * alpha + tl.sum(e, axis=1)
            zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
            m = m_new
        out = split * N + rows
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(zt_ptr + out, zt, mask=row_ok)
        if WITH_ENTROPY:
            tl.store(a_ptr + out, a, mask=row_ok)

    @triton.jit
    def _dlogits_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr,
                        N, V, H, stride_h, stride_w, stride_dz, inv_temp,
                        HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
        """dz tile = [g (1[v = t] - p) - e p (log p + ent)] / T, with z recomputed from h and W."""
        pid_n = tl.program_id(0)      # token blocks vary fastest: neighbouring programs share a W tile in L2
        pid_v = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < N
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_temp,
                         HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        logp = z - lse[:, None]
        p = tl.exp(logp)
        dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        if HAS_GENT:
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
            ge = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
            dz -= p * (ge[:, None] * (logp + ent[:, None]))
        if HAS_GLP:
            g = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
            tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
            onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
            dz += g[:, None] * (onehot - p)
        dz = dz * inv_temp
        ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
        tl.store(ptrs, dz, mask=row_ok[:, None] & col_ok[None, :])


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"impl='triton' needs triton, which failed to import: {IMPORT_ERROR!r}")
    if not hidden.is_cuda and not interpret_mode():
        raise RuntimeError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to debug on CPU)")
    if torch.float64 in (hidden.dtype, weight.dtype):
        raise ValueError("impl='triton' supports fp32/bf16/fp16 inputs; use impl='torch' for float64")


def _operands(hidden, weight):
    """Same-dtype contiguous operands for tl.dot plus the dot's constexprs. Precision: exact fp32 for
    fp32 inputs (tf32 would break the 1e-5 contract); bf16/fp16 products are exact in the fp32
    accumulator anyway. The interpreter (triton 3.9) runs tl.dot on bf16 tiles as raw uint16 bits
    (garbage ~1e10), so under TRITON_INTERPRET=1 bf16 tiles are upcast to fp32 before the dot (same
    result); on GPUs the bf16 tensor-core dot is used."""
    dt = hidden.dtype if hidden.dtype == weight.dtype else torch.float32
    h, w = hidden.to(dt).contiguous(), weight.to(dt).contiguous()
    upcast = interpret_mode() and dt == torch.bfloat16
    return h, w, dict(DOT_PRECISION="ieee" if dt == torch.float32 or upcast else "tf32", UPCAST_DOT=upcast)


class TritonLinearLogprobs(torch.autograd.Function):
    """Same contract as logprobs.ChunkedLinearLogprobs, forward/backward by Triton kernels."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, chunks: Tuple[int, int],
                with_entropy: bool, blocks: Tuple[int, int, int], n_split: Optional[int]):
        h, w, dot = _operands(hidden, weight)
        targets = targets.contiguous()
        N, H = h.shape
        V = w.shape[0]
        bn, bv, bh = blocks
        n_row_blocks = triton.cdiv(N, bn)
        if n_split is None:
            # enough programs to fill the GPU even when N is small (each split re-reads h, not W)
            sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 1
            n_split = max(1, min(triton.cdiv(V, bv), triton.cdiv(4 * sms, max(1, n_row_blocks))))
        v_per_split = triton.cdiv(triton.cdiv(V, n_split), bv) * bv     # whole tiles per split
        n_split = triton.cdiv(V, v_per_split)                             # no empty splits
        part = torch.empty(4, n_split, N, dtype=torch.float32, device=h.device)
        m, s, a, zt = part.unbind(0)
        if N > 0:
            _fwd_kernel[(n_row_blocks, n_split)](
                h, w, bias if bias is not None else h, targets, m, s, a, zt,
                N, V, H, h.stride(0), w.stride(0), 1.0 / temperature, v_per_split,
                HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, **dot,
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=NUM_WARPS, num_stages=_stages(h))
        # merge the vocab splits: M = max m_i, S = sum e^(m_i - M) s_i, A = sum e^(m_i - M) (a_i + (m_i - M) s_i)
        M = m.amax(0)
        wgt = torch.exp(m - M)
        S = (wgt * s).sum(0)
        lse = M + torch.log(S)
        logp = zt.sum(0) - lse
        ent = None
        if with_entropy:
            A = (wgt * (a + (m - M) * s)).sum(0)
            ent = torch.log(S) - A / S
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.chunks, ctx.blocks = temperature, chunks, blocks
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        nones = (None,) * 6
        if g_logp is None and g_ent is None:
            return (None, None, None) + nones
        h, w, dot = _operands(hidden, weight)
        bn, bv, bh = ctx.blocks
        C, Vc = ctx.chunks
        dz_buf = torch.empty(C, Vc, dtype=torch.float32, device=h.device)   # the only [C, Vc] buffer
        g_logp = g_logp.float().contiguous() if g_logp is not None else None
        g_ent = g_ent.float().contiguous() if g_ent is not None else None

        def block_dlogits(s, e, v0, v1, h_c, W_v):
            dz = dz_buf[: e - s, : v1 - v0]
            rows = slice(s, e)
            _dlogits_kernel[(triton.cdiv(e - s, bn), triton.cdiv(v1 - v0, bv))](
                h[rows], w[v0:v1], bias[v0:v1] if bias is not None else h, targets[rows] - v0, lse[rows],
                ent[rows] if g_ent is not None else lse, g_logp[rows] if g_logp is not None else lse,
                g_ent[rows] if g_ent is not None else lse, dz,
                e - s, v1 - v0, h.shape[1], h.stride(0), w.stride(0), dz.stride(0), 1.0 / ctx.temperature,
                HAS_BIAS=bias is not None, HAS_GLP=g_logp is not None, HAS_GENT=g_ent is not None,
                **dot, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=NUM_WARPS, num_stages=_stages(h))
            return dz

        grads = blockwise_backward(hidden, weight, bias, ctx.needs_input_grad[:3], C, Vc, torch.float32,
                                   block_dlogits)
        return grads + nones


def triton_core(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: Optional[torch.Tensor], temperature: float, with_entropy: bool,
                chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None,
                blocks: Tuple[int, int, int] = (BLOCK_N, BLOCK_V, BLOCK_H),
                n_split: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Flat entry point: hidden [N, H], targets [N] -> (logp [N], ent [N] or None), float32.
    chunk_size / vocab_chunk_size only shape the backward's [C, Vc] gradient buffer (as in the torch
    path); the forward has no [C, V] buffer at all. blocks = Triton tile sizes (BLOCK_N, BLOCK_V, BLOCK_H)."""
    _check(hidden, weight)
    bias = bias.contiguous() if bias is not None else None
    chunks = block_shape(hidden.shape[0], weight.shape[0], chunk_size, vocab_chunk_size)
    return TritonLinearLogprobs.apply(hidden, weight, bias, targets, temperature, chunks,
                                      with_entropy, tuple(blocks), n_split)
