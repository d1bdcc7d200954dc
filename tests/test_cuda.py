"""Checks that need a CUDA GPU (skipped without one; benchmarks/gpu_check.sh runs them on a GPU machine):
the Triton log-prob kernel against a float64 reference, bf16 greedy decoding against transformers'
generate, and the compiled decode step against the eager one."""

import pytest
import torch

from kernels import linear_logprobs, naive_linear_logprobs, triton_available
from rtpo.generation import SamplingConfig, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = torch.device("cuda")


def inputs(N, H, V, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) * H ** -0.5 * 3  # peaked logits, as a trained head gives
    b = torch.randn(V, generator=g) * 0.1
    t = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) < 0.7
    return h, W, b, t, mask


def grads(fn, h, W, b, t, mask, dtype, device, T):
    """(logp, entropy, d/dh, d/dW, d/db) of sum(logp * u + entropy * v) for fixed random u, v."""
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(h.shape[0], generator=g), torch.randn(h.shape[0], generator=g)
    h_, W_, b_ = (x.to(device, dtype).detach().clone().requires_grad_() for x in (h, W, b))
    logp, ent = fn(h_, W_, t.to(device), b_, temperature=T, mask=mask.to(device))
    (logp * u.to(device, logp.dtype) + ent * v.to(device, ent.dtype)).sum().backward()
    return [x.detach().double().cpu() for x in (logp, ent, h_.grad, W_.grad, b_.grad)]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_kernel_matches_float64_reference(dtype, tol):
    """The Triton path on the GPU equals the float64 naive reference (materialised logits) for log-probs,
    entropies and all three gradients, with masked rows poisoned (they must stay exactly 0): within
    1e-5 in fp32 (exact fp32 dots, no TF32), within bf16 rounding in bf16."""
    if not triton_available():
        pytest.skip("triton is not installed")
    h, W, b, t, mask = inputs(333, 96, 5003, seed=0)  # ragged against every tile size
    h[~mask] = float("nan")
    ref = grads(naive_linear_logprobs, h.masked_fill(~mask[:, None], 0), W, b, t, mask, torch.float64, "cpu", 0.8)
    out = grads(lambda *a, **k: linear_logprobs(*a, impl="triton", **k), h, W, b, t, mask, dtype, DEV, 0.8)
    for name, o, r in zip(("logp", "entropy", "grad hidden", "grad weight", "grad bias"), out, ref):
        assert torch.isfinite(o).all(), name
        assert rel(o, r) < tol, f"{name}: relative error {rel(o, r):.2e}"
    assert (out[0][~mask] == 0).all() and (out[2][~mask] == 0).all()


def test_auto_picks_triton_on_cuda_after_its_selfcheck():
    """impl='auto' on a CUDA tensor gives the Triton path's numbers once the self-check passed."""
    if not triton_available():
        pytest.skip("triton is not installed")
    h, W, b, t, mask = inputs(64, 64, 1000, seed=3)
    args = [x.to(DEV) for x in (h, W, t, b)]
    auto = linear_logprobs(*args, mask=mask.to(DEV))
    tri = linear_logprobs(*args, mask=mask.to(DEV), impl="triton")
    assert torch.equal(auto[0], tri[0]) and torch.equal(auto[1], tri[1])


def tiny_llama(seed, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=512, initializer_range=0.08)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).to(DEV, dtype).eval()


PROMPTS = [list(range(3, 40)), [7, 8, 9], list(range(100, 190)), [42] * 12]


def hf_greedy(model, prompts, n):
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=DEV)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=DEV)
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=0)[:, P:].tolist()


def test_bf16_greedy_matches_transformers_generate():
    """On the GPU in bf16, our greedy rollout equals transformers' generate(do_sample=False) token for
    token, each prompt alone (batch composition changes bf16 kernels' reduction order in both)."""
    m = tiny_llama(0, torch.bfloat16)
    for p in PROMPTS:
        ours = generate(m, [p], SamplingConfig(max_new_tokens=24, temperature=0.0)).completions[0]
        assert ours == hf_greedy(m, [p], 24)[0]


def test_compiled_decode_equals_eager():
    """compile=True (torch.compile of the decode step, static cache, CUDA graphs) gives the eager
    engine's completions: greedy in fp32, and sampled with the same generator seed."""
    m = tiny_llama(1, torch.float32)
    for sc, seed in ((SamplingConfig(max_new_tokens=20, temperature=0.0), None),
                     (SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=50), 3)):
        outs = []
        for compile in (False, True):
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            outs.append(generate(m, PROMPTS, sc, num_samples=2, generator=g, compile=compile))
        assert outs[1].stats["compiled"]
        assert outs[0].completions == outs[1].completions
