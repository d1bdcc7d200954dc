"""rtpo.generation: the KV-cached sampling loop, checked against transformers' generate and against
fake models whose logits the test controls."""

import logging
import types

import pytest
import torch

from rtpo.generation import GenerationOutput, SamplingConfig, generate, process_logits

V = 96  # vocabulary of the tiny random models
PROMPTS = [[5, 17, 3], list(range(20, 40)), [7], [60, 61, 62, 63, 64, 65, 66]]  # lengths 3, 20, 1, 7


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=V, max_position_embeddings=256,
              initializer_range=0.1)  # larger than default: peaked logits, varied greedy paths
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2", seed=1)


class FakeLM(torch.nn.Module):
    """A 'language model' whose next-token logits are table[current token], whatever the context.

    It speaks the same forward protocol as a transformers causal LM (cache argument, logits_to_keep)
    and ignores the cache, so the test knows every step's exact logits."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        from transformers import LlamaConfig

        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.config = LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                  vocab_size=table.shape[0])

        self.calls = []  # (input_ids, attention_mask, position_ids) of every forward

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        self.calls.append((input_ids, attention_mask.clone(), position_ids))
        return types.SimpleNamespace(logits=self.table[input_ids], cache=cache)


def successor_lm(n: int = 64) -> FakeLM:
    """Greedy (and near-greedy sampling) continues a token t with t + 1 (mod n)."""
    table = torch.full((n, n), -10.0)
    table[torch.arange(n), (torch.arange(n) + 1) % n] = 10.0
    return FakeLM(table)


class CharTokenizer:
    """Token t decodes to the letter chr(ord('a') + t % 26)."""

    def batch_decode(self, seqs, skip_special_tokens=False):
        return ["".join(chr(ord("a") + t % 26) for t in s) for s in seqs]


def hf_greedy(model, prompts, n, eos):
    """transformers' generate (greedy), left-padded batch, cut after the first EOS."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, eos_token_id=eos,
                         pad_token_id=0)[:, P:].tolist()
    return [c[:c.index(eos) + 1] if eos in c else c for c in out]


def run(m, prompts=PROMPTS, n=12, G=1, seed=None, **kw):
    sampling = kw.pop("sampling", None) or SamplingConfig(max_new_tokens=n, **kw.pop("sc", {}))
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return generate(m, prompts, sampling, num_samples=G, generator=g, **kw)


SAMPLE = dict(temperature=1.0, top_k=40, top_p=0.95)


def test_greedy_matches_hf_generate(model):
    """Greedy decoding equals transformers' generate(do_sample=False) token for token, for every prompt
    run alone and for the left-padded batch of prompts of different lengths (EOS included)."""
    eos = 11
    ours = run(model, n=16, sc=dict(temperature=0.0, eos_token_ids=(eos,))).completions
    assert ours == hf_greedy(model, PROMPTS, 16, eos)
    for p, c in zip(PROMPTS, ours):
        assert c == hf_greedy(model, [p], 16, eos)[0]
    assert len({tuple(c) for c in ours}) == len(PROMPTS)  # the prompts do lead to different outputs


def test_left_padded_row_equals_prompt_alone(qwen):
    """A row left-padded inside a batch generates exactly what its prompt generates alone."""
    batched = run(qwen, n=10, sc=dict(temperature=0.0)).completions
    assert batched == [run(qwen, prompts=[p], n=10, sc=dict(temperature=0.0)).completions[0]
                       for p in PROMPTS]


def test_prefix_sharing_matches_unshared(qwen):
    """Prefilling each prompt once and replicating its KV cache G times gives the same completions as
    prefilling all G copies: greedy and seeded sampling."""
    for sc, seed in [(dict(temperature=0.0), None), (SAMPLE, 3)]:
        shared = run(qwen, G=4, seed=seed, sc=sc, share_prefix=True)
        unshared = run(qwen, G=4, seed=seed, sc=sc, share_prefix=False)
        assert shared.completions == unshared.completions
        assert shared.stats["prefill_tokens"] * 4 == unshared.stats["prefill_tokens"]


def test_static_cache_matches_dynamic(model):
    """The preallocated static KV cache gives the same completions as the growing dynamic cache
    (greedy and seeded sampling, with rows finishing at EOS)."""
    for sc, seed in [(dict(temperature=0.0), None), (dict(SAMPLE, eos_token_ids=(1, 2, 3, 4)), 5)]:
        dyn = run(model, G=3, seed=seed, sc=sc, cache="dynamic")
        static = run(model, G=3, seed=seed, sc=sc, cache="static")
        assert static.completions == dyn.completions
        assert static.finish_reasons == dyn.finish_reasons


def test_compaction_and_chunking_do_not_change_outputs(qwen):
    """Dropping finished rows from the batch (any / auto / never) and decoding in chunks of whole
    groups (batch_size) leave every completion unchanged, with the static and the dynamic cache."""
    sc = dict(temperature=1.0, eos_token_ids=tuple(range(0, 96, 6)))  # ~1/6 chance per step: staggered ends
    for cache in ("dynamic", "static"):
        ref = run(qwen, n=24, G=4, seed=7, sc=sc, compact=False, cache=cache)
        lengths = {len(c) for c in ref.completions}
        assert len(lengths) > 3 and "eos" in ref.finish_reasons  # rows really end at different steps
        for kw in [dict(compact=True), dict(compact="auto"), dict(compact=0.5), dict(batch_size=8),
                   dict(batch_size=1, compact=True)]:
            out = run(qwen, n=24, G=4, seed=7, sc=sc, cache=cache, **kw)
            assert out.completions == ref.completions, kw
            assert out.finish_reasons == ref.finish_reasons, kw
        assert run(qwen, n=24, G=4, seed=7, sc=sc, compact=True, cache=cache).stats["compactions"] > 0
        assert run(qwen, n=24, G=4, seed=7, sc=sc, batch_size=8, cache=cache).stats["chunks"] == 2


def test_finished_rows_stop_costing_compute(qwen):
    """With compaction, decode forwards only carry unfinished rows: fewer row-steps than without."""
    sc = dict(temperature=1.0, eos_token_ids=tuple(range(0, 96, 4)))
    on = run(qwen, n=24, G=4, seed=2, sc=sc, compact=True).stats
    off = run(qwen, n=24, G=4, seed=2, sc=sc, compact=False).stats
    assert on["row_steps"] < off["row_steps"] and on["forward_passes"] == off["forward_passes"]


def test_top_k_only_emits_top_k_tokens():
    """With top-k, every emitted token is among the k highest logits of that step."""
    torch.manual_seed(0)
    table = torch.randn(V, V) * 2
    m, k = FakeLM(table), 5
    out = run(m, prompts=[[i] for i in range(8)], n=20, G=4, seed=0, sc=dict(temperature=1.5, top_k=k))
    seen = set()
    for r, c in enumerate(out.completions):
        prev = r // 4
        for tok in c:
            assert tok in table[prev].topk(k).indices.tolist()
            seen.add((prev, tok))
            prev = tok
    assert len(seen) > 2 * V // 4  # it samples: several of the k per context, not only the argmax


def test_top_p_only_emits_nucleus_tokens():
    """With top-p, every emitted token is in the nucleus: the most likely tokens whose probability mass
    before them (in descending order) is below top_p."""
    torch.manual_seed(1)
    table = torch.randn(V, V) * 2
    m, top_p, temp = FakeLM(table), 0.6, 0.8
    out = run(m, prompts=[[i] for i in range(8)], n=20, G=4, seed=0, sc=dict(temperature=temp, top_p=top_p))

    def nucleus(prev):
        probs, idx = (table[prev] / temp).softmax(-1).sort(descending=True)
        before = probs.cumsum(0) - probs
        return set(idx[before < top_p].tolist())

    sizes = []
    for r, c in enumerate(out.completions):
        prev = r // 4
        for tok in c:
            allowed = nucleus(prev)
            assert tok in allowed
            sizes.append(len(allowed))
            prev = tok
    assert max(sizes) > 1


def test_sampling_frequencies_follow_softmax():
    """Inverse-CDF sampling draws tokens with probability softmax(logits / T) after top-k masking:
    empirical frequencies over 4000 rows are within 4 standard errors of the target."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -0.5, 1.5])
    table = logits.expand(8, 8).clone()
    m, temp = FakeLM(table), 1.3
    out = run(m, prompts=[[0]], n=1, G=4000, seed=0, sc=dict(temperature=temp, top_k=6))
    counts = torch.bincount(torch.tensor([c[0] for c in out.completions]), minlength=8).double()
    target = (logits / temp).masked_fill(logits < 0.0, float("-inf")).softmax(-1).double()  # top 6: >= 0
    assert counts[target == 0].sum() == 0
    se = (target * (1 - target) / 4000).sqrt()
    assert ((counts / 4000 - target).abs() <= 4 * se + 1e-9).all(), (counts / 4000, target)


@pytest.mark.parametrize("temp,top_k,top_p", [(0.7, 20, 1.0), (1.0, 0, 0.8), (0.7, 20, 0.95), (2.0, 3, 0.3)])
def test_process_logits_matches_transformers_warpers(temp, top_k, top_p):
    """temperature -> top-k -> top-p gives the same masked logits as transformers' logits processors."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    x = torch.randn(6, 50) * 3
    ours = process_logits(x, SamplingConfig(temperature=temp, top_k=top_k, top_p=top_p))
    ref = TemperatureLogitsWarper(temp)(None, x.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.allclose(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])
    if top_k:
        assert (~torch.isinf(ours)).sum(-1).max() == top_k or top_p < 1


def test_temperature_to_zero_equals_greedy(qwen):
    """Sampling at a vanishing temperature picks the argmax every step: it equals greedy decoding."""
    greedy = run(qwen, n=12, G=2, sc=dict(temperature=0.0)).completions
    cold = run(qwen, n=12, G=2, seed=0, sc=dict(temperature=1e-6)).completions
    assert cold == greedy


def test_eos_stops_a_row_and_is_included():
    """A row ends at its first EOS token, which is the last token of its completion ("eos"); other rows
    keep going to their own end, unaffected (each equals its prompt run alone)."""
    m = successor_lm()
    prompts = [[3], [0], [30]]
    out = run(m, prompts=prompts, n=10, sc=dict(temperature=0.0, eos_token_ids=(7, 9)))
    assert out.completions == [[4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7], list(range(31, 41))]
    assert out.finish_reasons == ["eos", "eos", "length"]
    for p, c in zip(prompts, out.completions):
        assert run(m, prompts=[p], n=10, sc=dict(temperature=0.0, eos_token_ids=(7, 9))).completions == [c]


def test_per_row_stopping_with_real_model(qwen):
    """Rows of a real model that hit EOS at different steps end there; the rows that keep going produce
    exactly what they produce when nothing stops (finished rows emit nothing more)."""
    free = run(qwen, n=16, sc=dict(temperature=0.0)).completions
    eos = free[0][4]  # row 0 ends at step 4 at the latest; rows without this token run to the end
    out = run(qwen, n=16, sc=dict(temperature=0.0, eos_token_ids=(eos,)), compact=True)
    for c, f, why in zip(out.completions, free, out.finish_reasons):
        cut = f[:f.index(eos) + 1] if eos in f else f
        assert c == cut and why == ("eos" if eos in f else "length")
    assert len(out.completions[0]) <= 5 and len({len(c) for c in out.completions}) > 1


def test_stop_strings_end_a_row():
    """A row ends once its decoded completion contains a stop string, keeping the token that completed
    it ("stop"), also when the string spans tokens and appears long after the start."""
    m, tok = successor_lm(), CharTokenizer()
    sc = SamplingConfig(max_new_tokens=40, temperature=0.0, stop_strings=("de", "xy"))
    out = generate(m, [[0], [5]], sc, tokenizer=tok)
    assert out.completions == [[1, 2, 3, 4], list(range(6, 25))]  # "bcde"; "ghi...xy"
    assert out.finish_reasons == ["stop", "stop"]
    # "ab" first appears at tokens 26, 27 ("...yzab"), though "b" is the very first token
    sc = SamplingConfig(max_new_tokens=40, temperature=0.0, stop_strings=("ab",))
    out = generate(m, [[0], [40]], sc, tokenizer=tok)
    assert out.completions == [list(range(1, 28)), list(range(41, 54))]  # 53 = "b"
    assert out.finish_reasons == ["stop", "stop"]
    with pytest.raises(ValueError):
        generate(m, [[0]], sc)  # stop strings need a tokenizer


def test_positions_count_real_tokens_only():
    """Prefill positions are 0.. over each row's real tokens (padding masked out); each decode step
    feeds position = prompt length + step - 1 with a mask covering prompt and generated tokens."""
    m = successor_lm()
    prompts = [[1, 2, 3], [5], [7, 8]]
    run(m, prompts=prompts, n=4, G=2, sc=dict(temperature=0.0), compact=False)
    ids, mask, pos = m.calls[0]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert [p[3 - len(q):] for p, q in zip(pos.tolist(), prompts)] == [[0, 1, 2], [0], [0, 1]]
    for t, (ids, mask, pos) in enumerate(m.calls[1:], start=1):
        assert pos[:, 0].tolist() == [len(q) + t - 1 for q in prompts for _ in range(2)]
        assert mask.shape[1] == 3 + t and mask[:, 3:].eq(1).all()


def test_max_new_tokens_respected(qwen):
    """Without EOS every completion has exactly max_new_tokens tokens and finishes with "length"."""
    for n in (1, 7):
        out = run(qwen, n=n, G=2, seed=0, sc=SAMPLE)
        assert [len(c) for c in out.completions] == [n] * 2 * len(PROMPTS)
        assert out.finish_reasons == ["length"] * 2 * len(PROMPTS)
        assert out.stats["forward_passes"] == n  # 1 prefill + n - 1 decode steps
    assert run(qwen, n=0).completions == [[]] * len(PROMPTS)
    assert run(successor_lm(), prompts=[[0]], n=45, sc=dict(temperature=0.0)).completions == [
        [t % 64 for t in range(1, 46)]]


def test_seed_reproducibility_and_generator_advance(qwen):
    """Same generator seed -> same completions; another seed -> different ones. The generator advances
    by the same amount whatever the batching options, so a run can be resumed from its state."""
    a = run(qwen, G=4, seed=11, sc=SAMPLE).completions
    assert a == run(qwen, G=4, seed=11, sc=SAMPLE).completions
    assert a != run(qwen, G=4, seed=12, sc=SAMPLE).completions
    states = []
    for kw in [dict(), dict(share_prefix=False, compact=False, batch_size=4, cache="static")]:
        g = torch.Generator().manual_seed(0)
        generate(qwen, PROMPTS, SamplingConfig(max_new_tokens=12, **SAMPLE), num_samples=4, generator=g, **kw)
        states.append(g.get_state())
    assert torch.equal(states[0], states[1])


def test_output_layout_and_stats(qwen):
    """Row r belongs to prompt r // G; samples of one prompt differ; stats report the work done."""
    out = run(qwen, prompts=PROMPTS[:2], n=8, G=3, seed=4, sc=SAMPLE)
    assert isinstance(out, GenerationOutput) and len(out.completions) == 6
    assert len({tuple(c) for c in out.completions[:3]}) > 1
    s = out.stats
    assert s["tokens_generated"] == 48 and s["forward_passes"] == 8 and s["prefill_s"] > 0


def test_compile_on_cpu_falls_back_to_eager(qwen, caplog, monkeypatch):
    """compile=True on CPU logs (once) that it runs eager, and gives the eager completions."""
    import rtpo.generation as gen

    monkeypatch.setattr(gen, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="rtpo.generation"):
        out = run(qwen, n=6, G=2, seed=1, sc=SAMPLE, compile=True)
        run(qwen, n=6, G=2, seed=1, sc=SAMPLE, compile=True)
    assert caplog.text.count("GPU-only") == 1
    assert out.completions == run(qwen, n=6, G=2, seed=1, sc=SAMPLE).completions
    assert not out.stats["compiled"]


def test_bf16_greedy_matches_hf_generate():
    """A bf16 model decodes (float32 sampling on bf16 logits) like transformers' generate, prompt alone."""
    m = tiny_model("llama", seed=2, dtype=torch.bfloat16)
    p = PROMPTS[1]
    assert run(m, prompts=[p], n=8, sc=dict(temperature=0.0)).completions[0] == hf_greedy(m, [p], 8, V + 1)[0]


@pytest.mark.parametrize("share_prefix,cache", [(True, "dynamic"), (False, "static")])
def test_returned_logprobs_are_the_trainers_logprobs_of_the_sampled_tokens(qwen, share_prefix, cache):
    """return_logprobs gives, per generated token, log_softmax(logits / T) at the sampled token: the
    trainer's own log-prob pass (rtpo.logprobs, fused kernel) on the same prompt + completion agrees
    within 1e-4 in float32 (what truncated importance sampling divides by), with top-k on and rows
    finishing at different steps (compaction); the sampled tokens are those of a call without it."""
    from rtpo.logprobs import collate, completion_logprobs

    s = SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=20, eos_token_ids=(3, 11), pad_token_id=0)
    a = generate(qwen, PROMPTS, s, num_samples=3, generator=torch.Generator().manual_seed(4), share_prefix=share_prefix,
                 cache=cache, return_logprobs=True)
    b = generate(qwen, PROMPTS, s, num_samples=3, generator=torch.Generator().manual_seed(4), share_prefix=share_prefix,
                 cache=cache)
    assert a.completions == b.completions and b.logprobs is None
    assert [len(x) for x in a.logprobs] == [len(c) for c in a.completions]
    assert len({len(c) for c in a.completions}) > 1  # some rows stopped early
    prompts = [p for p in PROMPTS for _ in range(3)]
    batch = collate(prompts, a.completions, 0)
    with torch.no_grad():
        lp, _ = completion_logprobs(qwen, batch, temperature=0.7, with_entropy=False)
    for i, row in enumerate(a.logprobs):
        assert torch.allclose(torch.tensor(row), lp[i, :len(row)].float(), atol=1e-4)
