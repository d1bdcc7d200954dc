"""Tests for kernels/: fused linear -> log-prob / entropy (torch chunked, Triton, naive).

Every path is checked against an independent float64 reference written here (materialised logits),
on random inputs with fresh seeds, at shapes where N is not a multiple of the chunk and V not a
multiple of the tile. Triton runs on CPU under TRITON_INTERPRET=1 (tiny shapes; correctness only).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402
from kernels import default_chunk_size, linear_logprobs, naive_linear_logprobs  # noqa: E402
from kernels.logprobs import block_shape  # noqa: E402

LOGP_ATOL = 1e-5     # fp32 inputs: log-probs and entropies
GRAD_RTOL = 1e-4     # fp32 inputs: max|err| / max|ref| for each gradient


# ----------------------------------------------------------------------------- helpers

def reference64(h, W, t, b=None, T=1.0, mask=None):
    """Independent float64 reference: log_softmax of fully materialised logits."""
    z = h.double() @ W.double().T
    if b is not None:
        z = z + b.double()
    logp_all = torch.log_softmax(z / T, dim=-1)
    logp = logp_all.gather(-1, t[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    if mask is not None:
        logp, ent = torch.where(mask, logp, 0.0), torch.where(mask, ent, 0.0)
    return logp, ent


def make_inputs(N, H, V, *, bias=True, dtype=torch.float32, seed=0, lead=None):
    """Random hidden/weight/bias/targets with logits of O(3) spread (realistic peakiness)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(lead) if lead else (N,)
    h = torch.randn(*shape, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) * 3.0 / H ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, V, shape, generator=g)
    return h, W, b, t


def upstream(shape, seed):
    """Random incoming grads for (logp, ent): a trainer's loss weights both, with any sign."""
    g = torch.Generator().manual_seed(seed + 12345)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def run(fn, h, W, b, t, g_logp, g_ent, **kw):
    """Forward + backward of sum(g_logp*logp + g_ent*ent); returns outputs and grads (None where absent)."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (h, W, b)]
    logp, ent = fn(leaves[0], leaves[1], t, leaves[2], **kw)
    loss = (g_logp.to(logp.dtype) * logp).sum()
    if ent is not None and g_ent is not None:
        loss = loss + (g_ent.to(ent.dtype) * ent).sum()
    loss.backward()
    grads = [x.grad if x is not None else None for x in leaves]
    return logp.detach(), (ent.detach() if ent is not None else None), grads


def run_ref(h, W, b, t, g_logp, g_ent, T=1.0, mask=None):
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (h, W, b)]
    logp, ent = reference64(leaves[0], leaves[1], t, leaves[2], T, mask)
    ((g_logp * logp).sum() + (g_ent * ent).sum()).backward()
    return logp.detach(), ent.detach(), [x.grad if x is not None else None for x in leaves]


def rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_matches_reference(out, ref, *, atol=LOGP_ATOL, rtol=GRAD_RTOL):
    (logp, ent, grads), (rlogp, rent, rgrads) = out, ref
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert (logp.double() - rlogp).abs().max().item() < atol
    assert (ent.double() - rent).abs().max().item() < atol
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, rgrads):
        if rg is not None:
            assert g is not None, f"no gradient for {name}"
            assert rel_err(g, rg) < rtol, f"{name} grad rel err {rel_err(g, rg):.2e}"


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (in elements) produced by any aten op, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                n = x.untyped_storage().nbytes() // x.element_size()   # storage, so views don't count twice
                if n > self.largest:
                    self.largest, self.op = n, func
        return out


# (N, H, V, C, Vc, bias, temperature): blocks of C tokens x Vc vocab with N % C != 0 and V % Vc != 0,
# a single vocab block, a chunk larger than N, and the default block shape (None).
SHAPES = [
    (37, 24, 101, 8, 32, True, 1.0),
    (64, 16, 1000, 64, 1000, False, 1.0),
    (5, 8, 3, 2, 2, True, 0.6),
    (130, 32, 517, None, None, True, 1.7),
    (19, 12, 257, 100, 100, False, 0.9),
    (50, 16, 300, 50, 7, True, 1.0),
]
SHAPE_IDS = [f"N{s[0]}-H{s[1]}-V{s[2]}-C{s[3]}-Vc{s[4]}-{'b' if s[5] else 'nob'}-T{s[6]}" for s in SHAPES]


# ----------------------------------------------------------------------------- torch chunked + naive

@pytest.mark.parametrize("impl", ["torch", "naive"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_float64_reference(impl, shape, monkeypatch):
    """Log-probs and entropies agree with a float64 reference to 1e-5, and grads w.r.t. hidden, weight
    and bias (from a loss weighting BOTH outputs) to 1e-4 relative, for ragged token and vocab blocks
    (online LSE merged across vocab blocks), T != 1, and the default block shape."""
    N, H, V, C, Vc, bias, T = shape
    if C is not None:   # the public API takes chunk_size; the vocab block fills BLOCK_ELEMENTS = C * Vc
        monkeypatch.setattr(kernels.logprobs, "BLOCK_ELEMENTS", C * Vc)
        monkeypatch.setattr(kernels.logprobs, "BLOCK_ELEMENTS_CPU", C * Vc)
    seed = 100 + SHAPES.index(shape)
    h, W, b, t = make_inputs(N, H, V, bias=bias, seed=seed)
    g_logp, g_ent = upstream(N, seed)
    out = run(linear_logprobs, h, W, b, t, g_logp, g_ent, temperature=T, chunk_size=C, impl=impl)
    assert_matches_reference(out, run_ref(h, W, b, t, g_logp, g_ent, T))


def test_gradcheck_float64():
    """The custom backward is the exact derivative: torch.autograd.gradcheck passes in float64
    (float64 inputs are computed in float64), with bias, T != 1, and a chunk that splits N."""
    h, W, b, t = make_inputs(7, 5, 11, seed=1, dtype=torch.float64)
    h, W, b = (x.requires_grad_() for x in (h, W, b))

    def f(h, W, b):
        return linear_logprobs(h, W, t, b, temperature=0.7, chunk_size=3, impl="torch")

    assert torch.autograd.gradcheck(f, (h, W, b))


def test_temperature_changes_the_distribution():
    """Temperature divides the logits before the softmax: T=0.5 gives the reference at T=0.5
    (and clearly not the T=1 values), both log-probs and entropy."""
    h, W, b, t = make_inputs(21, 16, 97, seed=2)
    logp, ent = linear_logprobs(h, W, t, b, temperature=0.5, chunk_size=4, impl="torch")
    r_logp, r_ent = reference64(h, W, t, b, T=0.5)
    one_logp, one_ent = reference64(h, W, t, b, T=1.0)
    assert (logp.double() - r_logp).abs().max() < LOGP_ATOL and (ent.double() - r_ent).abs().max() < LOGP_ATOL
    assert (logp.double() - one_logp).abs().max() > 0.1 and (ent.double() - one_ent).abs().max() > 0.1


@pytest.mark.parametrize("which", ["logp_only", "entropy_only", "no_entropy_output"])
def test_gradient_from_a_single_output(which):
    """Gradients are right when only one output feeds the loss (the other's grad arrives as None
    and its term is skipped), and return_entropy=False returns None for the entropy."""
    N, H, V = 29, 16, 131
    h, W, b, t = make_inputs(N, H, V, seed=3)
    g_logp, g_ent = upstream(N, 3)
    zeros = torch.zeros(N, dtype=torch.float64)
    if which == "entropy_only":
        g_logp = zeros
    else:
        g_ent = zeros
    kw = dict(chunk_size=8, impl="torch", return_entropy=which != "no_entropy_output")
    leaves = [x.clone().requires_grad_() for x in (h, W, b)]
    logp, ent = linear_logprobs(leaves[0], leaves[1], t, leaves[2], **kw)
    if which == "no_entropy_output":
        assert ent is None
    loss = (g_ent.float() * ent).sum() if which == "entropy_only" else (g_logp.float() * logp).sum()
    loss.backward()
    _, _, rgrads = run_ref(h, W, b, t, g_logp, g_ent)
    for leaf, rg in zip(leaves, rgrads):
        assert rel_err(leaf.grad, rg) < GRAD_RTOL


@pytest.mark.parametrize("impl", ["torch", "naive"])
@pytest.mark.parametrize("poison", [1e4, float("nan")])
def test_masked_rows_are_skipped(impl, poison, monkeypatch):
    """Masked positions output exactly 0, their hidden grads are exactly 0, and poisoning their hidden
    rows (1e4 or NaN) changes nothing else: unmasked outputs and all grads are bit-identical to a clean
    run, NaN-free, and match the float64 reference (torch path in 7 x 50 blocks)."""
    N, H, V = 45, 16, 203
    monkeypatch.setattr(kernels.logprobs, "BLOCK_ELEMENTS", 7 * 50)
    h, W, b, t = make_inputs(N, H, V, seed=4)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(5)) < 0.6
    t = torch.where(mask, t, -100)                       # ignore-index style targets at masked positions
    g_logp, g_ent = upstream(N, 4)
    kw = dict(mask=mask, chunk_size=7) if impl == "torch" else dict(mask=mask)
    fn = linear_logprobs if impl == "torch" else naive_linear_logprobs
    clean = run(fn, h, W, b, t, g_logp, g_ent, **kw)
    bad_h = h.clone()
    bad_h[~mask] = poison
    dirty = run(fn, bad_h, W, b, t, g_logp, g_ent, **kw)
    for a, c in zip((dirty[0], dirty[1], *dirty[2]), (clean[0], clean[1], *clean[2])):
        assert torch.isfinite(a).all() and torch.equal(a, c)
    logp, ent, (dh, _, _) = dirty
    assert (logp[~mask] == 0).all() and (ent[~mask] == 0).all() and (dh[~mask] == 0).all()
    ref = run_ref(h, W, b, t.clamp_min(0), g_logp, g_ent, mask=mask)
    assert_matches_reference(dirty, ref)


def test_all_masked():
    """A fully masked batch returns zeros and zero gradients (no empty-tensor edge case crashes)."""
    h, W, b, t = make_inputs(9, 8, 33, seed=6)
    mask = torch.zeros(9, dtype=torch.bool)
    logp, ent, (dh, dW, db) = run(linear_logprobs, h, W, b, t, *upstream(9, 6), mask=mask, impl="torch")
    assert not logp.any() and not ent.any() and not dh.any() and not dW.any() and not db.any()


def test_leading_dims_are_flattened_and_restored():
    """[B, T, H] hidden with [B, T] targets/mask gives [B, T] outputs equal to the flattened call."""
    B, S, H, V = 3, 11, 16, 75
    h, W, b, t = make_inputs(None, H, V, seed=7, lead=(B, S))
    mask = torch.rand(B, S, generator=torch.Generator().manual_seed(7)) < 0.7
    logp, ent = linear_logprobs(h, W, t, b, mask=mask, chunk_size=5, impl="torch")
    assert logp.shape == ent.shape == (B, S)
    r_logp, r_ent = reference64(h, W, t, b, mask=mask)
    assert (logp.double() - r_logp).abs().max() < LOGP_ATOL and (ent.double() - r_ent).abs().max() < LOGP_ATOL


def test_bf16_inputs():
    """bf16 inputs are computed in float32: outputs are float32 and equal (to 1e-5) the fp32 path on the
    same bf16-rounded values, are within bf16 rounding of the fp32-input results, and grads come back
    in bf16 close to the fp32 grads."""
    N, H, V = 33, 32, 301
    h, W, b, t = make_inputs(N, H, V, seed=8)
    g_logp, g_ent = upstream(N, 8)
    hb, Wb, bb = h.bfloat16(), W.bfloat16(), b.bfloat16()
    logp, ent, grads = run(linear_logprobs, hb, Wb, bb, t, g_logp, g_ent, chunk_size=8, impl="torch")
    assert logp.dtype == ent.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    up = run(linear_logprobs, hb.float(), Wb.float(), bb.float(), t, g_logp, g_ent, chunk_size=8, impl="torch")
    assert (logp - up[0]).abs().max() < 1e-5 and (ent - up[1]).abs().max() < 1e-5
    for g, ug in zip(grads, up[2]):
        assert rel_err(g, ug) < 1e-2                     # only the final bf16 rounding of the grad differs
    full = run(linear_logprobs, h, W, b, t, g_logp, g_ent, chunk_size=8, impl="torch")
    assert (logp - full[0]).abs().max() < 0.1 and (ent - full[1]).abs().max() < 0.1
    for g, fg in zip(grads, full[2]):
        assert rel_err(g, fg) < 5e-2


@pytest.mark.parametrize("C,Vc", [(16, 500), (256, 40)], ids=["token-chunks", "vocab-chunks"])
def test_chunked_path_never_allocates_n_by_v(C, Vc, monkeypatch):
    """With blocks << N*V, no tensor allocated in forward or backward (largest aten output storage)
    and no tensor saved for backward reaches N*V elements: the largest is one [C, Vc] block of logits
    (or the [V, H] weight grad, or [N, H]). The same probe does see an N*V tensor on the naive path."""
    N, H, V = 256, 8, 500
    monkeypatch.setattr(kernels.logprobs, "BLOCK_ELEMENTS", C * Vc)
    monkeypatch.setattr(kernels.logprobs, "BLOCK_ELEMENTS_CPU", C * Vc)
    h, W, b, t = make_inputs(N, H, V, seed=9)
    h.requires_grad_(), W.requires_grad_(), b.requires_grad_()
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    for impl, largest_ok in (("torch", max(C * Vc, V * H, N * H)), ("naive", N * V)):
        saved.clear()
        with LargestAllocation() as probe, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            logp, ent = linear_logprobs(h, W, t, b, chunk_size=C, impl=impl)
            (logp.sum() + ent.sum()).backward()
        if impl == "torch":
            assert probe.largest <= largest_ok < N * V, (probe.largest, probe.op)
            assert max(saved) < N * V
        else:
            assert probe.largest >= N * V and max(saved) >= N * V


def test_tied_embeddings():
    """A weight shared with the input embedding gets the sum of both gradient paths, as with naive."""
    N, H, V = 23, 16, 89
    g = torch.Generator().manual_seed(10)
    ids = torch.randint(0, V, (N,), generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    grads = {}
    for impl in ("torch", "naive"):
        torch.manual_seed(10)
        emb = torch.nn.Embedding(V, H)
        proj = torch.nn.Linear(H, H)
        logp, ent = linear_logprobs(torch.tanh(proj(emb(ids))), emb.weight, t, chunk_size=6, impl=impl)
        (logp.sum() - 0.1 * ent.sum()).backward()
        grads[impl] = emb.weight.grad
    assert rel_err(grads["torch"], grads["naive"]) < GRAD_RTOL
    assert (grads["torch"][ids] != 0).any()              # the embedding path contributed too


def test_dispatch_and_validation():
    """impl='auto' on CPU is the chunked torch path (bit-identical); bad impl/shapes/temperature and
    out-of-range targets at unmasked positions raise instead of giving silent garbage."""
    h, W, b, t = make_inputs(17, 8, 40, seed=11)
    auto = linear_logprobs(h, W, t, b, chunk_size=4)
    torch_ = linear_logprobs(h, W, t, b, chunk_size=4, impl="torch")
    assert torch.equal(auto[0], torch_[0]) and torch.equal(auto[1], torch_[1])
    with pytest.raises(ValueError):
        linear_logprobs(h, W, t, b, impl="cuda")
    with pytest.raises(ValueError):
        linear_logprobs(h, W, t[:-1], b)
    with pytest.raises(ValueError):
        linear_logprobs(h, W, t, b, temperature=0.0)
    with pytest.raises(ValueError, match="targets must lie in"):   # -100 at an unmasked position
        linear_logprobs(h, W, torch.where(t > 20, -100, t), b, impl="torch")
    with pytest.raises(ValueError, match="targets must lie in"):   # id == V under a mask that keeps it
        linear_logprobs(h, W, torch.full_like(t, 40), b, mask=torch.ones(17, dtype=torch.bool))


def test_default_block_shape_bounds_chunk_logits():
    """The default block keeps one block's float32 logits at <= 256 MiB for real vocabularies and
    token counts, an explicit chunk_size is honoured, and the blocks stay wide enough for GEMMs."""
    for V in (32_000, 151_936, 262_144):
        for N in (1, 512, 4096, 16_384, 100_000):
            C, Vc = block_shape(N, V)
            assert 1 <= C <= N and 1 <= Vc <= V and C * Vc * 4 <= 256 * 2 ** 20
            assert Vc >= min(V, 4096) and C >= min(N, 16_384)
        assert block_shape(1000, V, chunk_size=64) == (64, V)          # small chunk: whole vocab per block
    assert default_chunk_size(151_936) == 16_384


# ----------------------------------------------------------------------------- Triton (interpreter on CPU)
#
# TRITON_INTERPRET=1 must be set before `import triton` (triton's own @jit helpers, e.g. the tl.sum
# combine function, are built at import time), and other code in this process may already have
# imported triton (torch._dynamo does). So the check_triton_* functions below run in one child
# process started with TRITON_INTERPRET=1; each test_triton_* asserts its check passed there.

def check_triton_matches_float64_reference():
    """Body of test_triton_matches_float64_reference (runs in the TRITON_INTERPRET=1 child)."""
    from kernels.triton_logprobs import triton_core
    for N, H, V, blocks, n_split, C, Vc, bias, T in [(37, 40, 101, (16, 32, 16), None, 16, 40, True, 1.0),
                                                     (50, 33, 300, (16, 16, 16), 5, 24, None, False, 0.7)]:
        h, W, b, t = make_inputs(N, H, V, bias=bias, seed=20 + N)
        g_logp, g_ent = upstream(N, 20 + N)

        def fn(h, W, t, b):
            return triton_core(h, W, t, b, T, True, chunk_size=C, vocab_chunk_size=Vc, blocks=blocks,
                               n_split=n_split)

        assert_matches_reference(run(fn, h, W, b, t, g_logp, g_ent), run_ref(h, W, b, t, g_logp, g_ent, T))


def check_triton_public_api_mask_and_single_output():
    """Body of test_triton_public_api_mask_and_single_output (runs in the TRITON_INTERPRET=1 child)."""
    N, H, V = 30, 16, 70
    h, W, b, t = make_inputs(N, H, V, seed=21)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(21)) < 0.6
    h[~mask] = 1e4
    g_logp, _ = upstream(N, 21)
    logp, ent, grads = run(linear_logprobs, h, W, b, t, g_logp, None, mask=mask, impl="triton", chunk_size=8)
    assert ent is not None and (logp[~mask] == 0).all() and (ent[~mask] == 0).all() and (grads[0][~mask] == 0).all()
    r_logp, r_ent, r_grads = run_ref(h, W, b, t, g_logp, torch.zeros(N, dtype=torch.float64), mask=mask)
    assert (logp.double() - r_logp).abs().max() < LOGP_ATOL and (ent.double() - r_ent).abs().max() < LOGP_ATOL
    for g, rg in zip(grads, r_grads):
        assert rel_err(g, rg) < GRAD_RTOL


def check_triton_bf16_matches_torch_path():
    """Body of test_triton_bf16_matches_torch_path (runs in the TRITON_INTERPRET=1 child)."""
    N, H, V = 20, 32, 90
    h, W, b, t = make_inputs(N, H, V, seed=22, dtype=torch.bfloat16)
    g_logp, g_ent = upstream(N, 22)
    for gl, ge, with_ent in ((g_logp, g_ent, True), (torch.zeros(N, dtype=torch.float64), g_ent, True),
                             (g_logp, None, False)):
        kw = dict(temperature=1.3, return_entropy=with_ent)
        tri = run(linear_logprobs, h, W, b, t, gl, ge, impl="triton", **kw)
        ref = run(linear_logprobs, h, W, b, t, gl, ge, impl="torch", **kw)
        assert tri[0].dtype == torch.float32 and [g.dtype for g in tri[2]] == [torch.bfloat16] * 3
        assert (tri[0] - ref[0]).abs().max() < 1e-5
        assert (tri[1] is None) == (not with_ent) and (not with_ent or (tri[1] - ref[1]).abs().max() < 1e-5)
        for g, rg in zip(tri[2], ref[2]):
            assert rel_err(g, rg) < 1e-2


def check_triton_selfcheck_gates_auto():
    """Body of test_triton_selfcheck_gates_auto (runs in the TRITON_INTERPRET=1 child)."""
    import warnings

    import kernels.triton_logprobs as tlp
    cpu = torch.device("cpu")
    assert kernels.triton_selfcheck(cpu, torch.float32, torch.float32)
    assert kernels.triton_selfcheck(cpu, torch.bfloat16, torch.bfloat16)
    good = tlp.triton_core

    def wrong(*args, **kw):   # a kernel bug: entropy off by 10%
        logp, ent = good(*args, **kw)
        return logp, ent * 1.1

    tlp.triton_core = wrong
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not kernels.triton_selfcheck(cpu, torch.float32, torch.float32)
        assert any("entropy differs from the torch path" in str(w.message) for w in caught)
    finally:
        tlp.triton_core = good


TRITON_CHECKS = [check_triton_matches_float64_reference, check_triton_public_api_mask_and_single_output,
                 check_triton_bf16_matches_torch_path, check_triton_selfcheck_gates_auto]


def _triton_child() -> dict:
    """Runs in the TRITON_INTERPRET=1 child: {check name: "ok" | traceback}, or {"__skip__": reason}."""
    import traceback
    try:
        from kernels import triton_logprobs as tlp
    except Exception as exc:  # noqa: BLE001
        return {"__skip__": f"importing kernels.triton_logprobs failed: {exc!r}"}
    if not tlp.HAS_TRITON:
        return {"__skip__": f"triton failed to import: {tlp.IMPORT_ERROR!r}"}
    try:  # can the interpreter run our kernels at all?
        h, W, b, t = make_inputs(3, 16, 20, seed=0)
        tlp.triton_core(h, W, t, b, 1.0, True, blocks=(16, 16, 16))
    except Exception as exc:  # noqa: BLE001
        return {"__skip__": f"the Triton interpreter (TRITON_INTERPRET=1) cannot run the kernels on CPU: {exc!r}"}
    results = {}
    for check in TRITON_CHECKS:
        try:
            check()
            results[check.__name__] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test, which fails with it
            results[check.__name__] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def triton_results():
    """Run every check_triton_* once in a child process with TRITON_INTERPRET=1; skip (with the reason)
    when triton is missing or its interpreter cannot run the kernels here."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed, so the Triton path cannot be tested")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--triton-child"], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TRITON_RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"Triton child process failed (rc={proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    results = json.loads(lines[-1][len("TRITON_RESULTS "):])
    if "__skip__" in results:
        pytest.skip(results["__skip__"])
    return results


def _expect_ok(results, check):
    status = results.get(check.__name__)
    assert status == "ok", f"{check.__name__} failed under TRITON_INTERPRET=1:\n{status}"


def test_triton_matches_float64_reference(triton_results):
    """Triton forward (online LSE over vocab tiles, merged across 1 and 5 vocab splits) and backward
    (recomputed dlogits tiles) match the float64 reference: 1e-5 outputs, 1e-4 relative grads, with
    ragged row/vocab/H tiles, bias on/off, T != 1, and backward blocks that split N and V.
    (Checked in a TRITON_INTERPRET=1 child process; see the comment above check_triton_*.)"""
    _expect_ok(triton_results, check_triton_matches_float64_reference)


def test_triton_public_api_mask_and_single_output(triton_results):
    """linear_logprobs(impl='triton') with a mask and 1e4-poisoned masked rows: masked outputs and grads
    are exactly 0, the rest match the reference; a logp-only loss (entropy grad None) is right too.
    (Checked in a TRITON_INTERPRET=1 child process; see the comment above check_triton_*.)"""
    _expect_ok(triton_results, check_triton_public_api_mask_and_single_output)


def test_triton_bf16_matches_torch_path(triton_results):
    """bf16 inputs on the Triton path agree with the torch chunked path on the same bf16 inputs:
    outputs float32 to 1e-5, grads bf16 to bf16 rounding; entropy-only loss, return_entropy=False.
    (Checked in a TRITON_INTERPRET=1 child process; see the comment above check_triton_*.)"""
    _expect_ok(triton_results, check_triton_bf16_matches_torch_path)


def test_triton_selfcheck_gates_auto(triton_results):
    """The first-use self-check that gates impl='auto' -> Triton passes for correct kernels (fp32, bf16)
    and fails, with a warning naming the wrong output, when the Triton path is wrong.
    (Checked in a TRITON_INTERPRET=1 child process; see the comment above check_triton_*.)"""
    _expect_ok(triton_results, check_triton_selfcheck_gates_auto)


if __name__ == "__main__" and "--triton-child" in sys.argv:
    print("TRITON_RESULTS " + json.dumps(_triton_child()), flush=True)
