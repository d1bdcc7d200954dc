"""Memory-lean per-token log-probs and entropies straight from last hidden states.

    logp, ent = linear_logprobs(hidden, lm_head.weight, targets, temperature=T, mask=mask)

computes, for every position, with z = (h W^T + b) / T:
    logp = z[target] - logsumexp(z)          log-prob of the sampled token at temperature T
    ent  = logsumexp(z) - sum softmax(z) * z entropy of the same distribution
without ever materialising the [N, V] logits (impl "torch": [tokens x vocab] blocks with an online
log-sum-exp across vocab blocks; "triton": the same over vocab tiles inside one kernel). Both
outputs are differentiable w.r.t. hidden, weight and bias (backward recomputes logits per block).
Masked positions output 0 and are never computed, so they contribute exactly zero gradient.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from .logprobs import chunked_core, default_chunk_size
from .reference import naive_core

__all__ = ["linear_logprobs", "naive_linear_logprobs", "default_chunk_size", "triton_available", "triton_selfcheck"]

IMPLS = ("auto", "torch", "triton", "naive")


def triton_available() -> bool:
    """True when triton imports (the module is only imported on first use)."""
    from . import triton_logprobs
    return triton_logprobs.HAS_TRITON


_TRITON_CHECKED: Dict[tuple, bool] = {}     # (device, hidden dtype, weight dtype) -> passed the self-check


def triton_selfcheck(device: torch.device, hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Compile and run the Triton forward + backward once on a small problem on `device` and compare with
    the torch path (max error / max value < 2e-2 for outputs and grads: catches wrong kernels, tolerates
    bf16 / TF32 rounding). impl="auto" uses Triton on a device only after this passes; on failure it
    warns once and uses the torch path, so an unseen GPU/Triton combination degrades to slower, not broken."""
    try:
        from .triton_logprobs import HAS_TRITON, IMPORT_ERROR, triton_core
        if not HAS_TRITON:
            raise RuntimeError(f"triton failed to import: {IMPORT_ERROR!r}")
        g = torch.Generator().manual_seed(0)
        N, H, V = 70, 64, 300                                   # ragged against every tile size
        h0 = torch.randn(N, H, generator=g)
        W0 = torch.randn(V, H, generator=g) * 0.3
        t = torch.randint(0, V, (N,), generator=g).to(device)
        outs = []
        for core in (triton_core, chunked_core):
            h = h0.to(device, hidden_dtype).requires_grad_()
            W = W0.to(device, weight_dtype).requires_grad_()
            with torch.enable_grad():
                logp, ent = core(h, W, t, None, 0.9, True)
                gh, gW = torch.autograd.grad((logp + 0.5 * ent).sum(), (h, W))
            outs.append([x.detach().float() for x in (logp, ent, gh, gW)])
        for name, a, b in zip(("logp", "entropy", "grad hidden", "grad weight"), *outs):
            err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
            if not err < 2e-2:
                raise RuntimeError(f"{name} differs from the torch path (rel err {err:.2e})")
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "do not auto-select Triton here"
        warnings.warn(f"kernels: Triton log-prob path failed its self-check on {device} "
                      f"({hidden_dtype}/{weight_dtype}): {exc!r}; impl='auto' uses the torch path there")
        return False


def _resolve(impl: str, hidden: torch.Tensor, weight: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if hidden.is_cuda and torch.float64 not in (hidden.dtype, weight.dtype) and triton_available():
        key = (str(hidden.device), hidden.dtype, weight.dtype)
        if key not in _TRITON_CHECKED:
            _TRITON_CHECKED[key] = triton_selfcheck(hidden.device, hidden.dtype, weight.dtype)
        if _TRITON_CHECKED[key]:
            return "triton"
    return "torch"


def _check_targets(t: torch.Tensor, V: int) -> None:
    """Out-of-range ids would silently give logp = -lse on the blockwise paths (no vocab block holds them),
    so reject them (one host sync; e.g. an ignore index of -100 at a position the mask does not drop)."""
    if t.numel() and bool(((t < 0) | (t >= V)).any()):
        bad = t[(t < 0) | (t >= V)][:5].tolist()
        raise ValueError(f"targets must lie in [0, {V}) at unmasked positions; got e.g. {bad}")


def _apply(core: Callable, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
           bias: Optional[torch.Tensor], temperature: float, mask: Optional[torch.Tensor],
           return_entropy: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Flatten leading dims, drop masked rows before any compute, run `core`, scatter back, restore shape."""
    lead = hidden.shape[:-1]
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V, H] disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if targets.shape != lead:
        raise ValueError(f"targets must have hidden's leading shape {tuple(lead)}, got {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).long()
    if mask is None:
        _check_targets(t, weight.shape[0])
        logp, ent = core(h, weight, t, bias, temperature, return_entropy)
    else:
        if mask.shape != lead:
            raise ValueError(f"mask must have hidden's leading shape {tuple(lead)}, got {tuple(mask.shape)}")
        # Selecting rows (instead of zeroing outputs afterwards) means masked rows never enter a matmul:
        # garbage there (even inf/NaN) cannot leak into dW, and their grad is exactly 0 from index_select.
        idx = mask.reshape(-1).nonzero().squeeze(1)
        t_k = t.index_select(0, idx)
        _check_targets(t_k, weight.shape[0])
        logp_k, ent_k = core(h.index_select(0, idx), weight, t_k, bias, temperature, return_entropy)
        logp = logp_k.new_zeros(t.shape[0]).index_copy(0, idx, logp_k)
        ent = ent_k.new_zeros(t.shape[0]).index_copy(0, idx, ent_k) if ent_k is not None else None
    return logp.reshape(lead), (ent.reshape(lead) if ent is not None else None)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                    mask: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
                    impl: str = "auto", return_entropy: bool = True):
    """hidden [..., H], weight [V, H], targets [...] (long) -> (logp [...], entropy [...] or None), float32.

    impl: "auto" (triton on CUDA if available, else torch chunked) | "torch" | "triton" | "naive".
    ("auto" picks Triton on a CUDA device once triton_selfcheck passed there, else the torch path.)
    Computes in float32 for any input dtype (float64 stays float64); grads come back in the input dtypes.
    chunk_size: tokens per block (default min(N, 16384)); the vocab is then cut into blocks so one block's
    float32 logits stay <= 256 MiB (kernels.logprobs.block_shape).
    mask [...] bool: False positions output 0 for both and get exactly zero gradient.
    Targets at unmasked positions must lie in [0, V).
    """
    which = _resolve(impl, hidden, weight)
    if which == "naive":
        core = naive_core
    elif which == "torch":
        def core(h, w, t, b, T, ent):
            return chunked_core(h, w, t, b, T, ent, chunk_size=chunk_size)
    else:
        from .triton_logprobs import triton_core

        def core(h, w, t, b, T, ent):
            return triton_core(h, w, t, b, T, ent, chunk_size=chunk_size)
    return _apply(core, hidden, weight, targets, bias, temperature, mask, return_entropy)


def naive_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                          mask: Optional[torch.Tensor] = None, return_entropy: bool = True):
    """Reference: materialises [N, V] logits and a log-softmax (plain autograd). Same contract as linear_logprobs."""
    return _apply(naive_core, hidden, weight, targets, bias, temperature, mask, return_entropy)
