"""rtpo/logprobs.py: the packed, prompt-shared layout against the padded one.

Every comparison runs the padded layout in float64 as the reference: the packed layout must equal it
to F64_TOL (same math; not 1e-15 because transformers' RMSNorm computes in float32 whatever the model's
dtype), and in float32 within 1e-5 (loss and every parameter's gradient)."""

from __future__ import annotations

import random

import pytest
import torch

from rtpo.config import ConfigError, RTPOConfig
from rtpo.embedded import build_model, build_tokenizer
from rtpo.logprobs import (collate, completion_logprobs, make_batch, pack, packing_problem, row_tokens,
                           split_by_tokens, split_even, tree_completions)
from rtpo.losses import policy_loss

G = 4
F64_TOL = 1e-7


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def embedded(tok):
    return build_model(tok, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, seed=3)


def tiny_llama(vocab, attn="sdpa"):
    """A real architecture (Llama: RoPE, GQA, untied head with its own weight), built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, attn_implementation=attn)
    torch.manual_seed(5)
    return LlamaForCausalLM(cfg).eval()


def rows(vocab, groups=3, seed=0, empty=True):
    """G rows per group, the group's prompt shared (the same list object, as the trainer's rollout), prompts
    of different lengths and completions of 0..9 tokens (one empty: a row with nothing to score)."""
    g = random.Random(seed)
    prompts, comps = [], []
    for k in range(groups):
        p = [g.randrange(6, vocab) for _ in range(g.randint(3, 14))]
        for j in range(G):
            n = 0 if (empty and k == 1 and j == 2) else g.randint(1, 9)
            prompts.append(p)
            comps.append([g.randrange(6, vocab) for _ in range(n)])
    return prompts, comps


def loss_and_grads(model, prompts, comps, micro, layout, dtype):
    """dapo loss over micro batches `micro` (lists of row indices) with the whole batch's normalisers, as the
    trainer accumulates it; (loss, {name: grad}) in float64."""
    model = model.to(dtype)
    model.zero_grad(set_to_none=True)
    n_tokens = sum(len(c) for c in comps)
    adv = torch.linspace(-1.0, 1.0, len(comps), dtype=torch.float64)
    total = 0.0
    for mb in micro:
        p, c = [prompts[i] for i in mb], [comps[i] for i in mb]
        batch = {"packed": lambda: pack(p, c, 0), "unshared": lambda: pack(p, c, 0, share_prefix=False),
                 "split": lambda: pack(p, c, 0, hidden_size=1), "padded": lambda: collate(p, c, 0)}[layout]()
        logp, ent = completion_logprobs(model, batch, temperature=0.7)
        old = logp.detach() + 0.05 * torch.cos(torch.arange(logp.numel(), dtype=logp.dtype)).view_as(logp)
        loss, _ = policy_loss(logp, old, adv[mb].to(logp.dtype), batch["completion_mask"], loss_type="dapo",
                              entropy=ent, entropy_coef=0.01, n_seqs=len(comps), n_tokens=n_tokens, max_len=16)
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.to(torch.float32)
    return total, grads


def assert_close(a, b, tol):
    (la, ga), (lb, gb) = a, b
    assert abs(la - lb) <= tol, (la, lb)
    assert ga.keys() == gb.keys()
    worst = max((ga[k] - gb[k]).abs().max().item() for k in ga)
    assert worst <= tol, worst


# a micro batch split that cuts groups: rows 0-5 hold group 0 and half of group 1, rows 6-11 the rest
SPLITS = {"whole batch": [list(range(3 * G))], "groups split": [list(range(6)), list(range(6, 3 * G))],
          "one row each": [[i] for i in range(3 * G)]}


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("arch", ["embedded", "llama"])
def test_packed_loss_and_gradients_equal_the_padded_layout(tok, arch, split):
    """Shared prompt (each distinct prompt once per micro batch), and packed without sharing, give the padded
    layout's loss and gradients: float64 to rounding, float32 within 1e-5 of the float64 reference, with
    micro batches that split a group."""
    model = embedded(tok) if arch == "embedded" else tiny_llama(len(tok))
    prompts, comps = rows(len(tok))
    micro = SPLITS[split]
    assert len(pack(prompts, comps, 0, hidden_size=1)["prompt_order"]) > len(pack(prompts, comps, 0)["prompt_order"])
    ref = loss_and_grads(model, prompts, comps, micro, "padded", torch.float64)
    for layout in ("packed", "unshared", "split"):
        assert_close(loss_and_grads(model, prompts, comps, micro, layout, torch.float64), ref, F64_TOL)
        assert_close(loss_and_grads(model, prompts, comps, micro, layout, torch.float32), ref, 1e-5)
    assert_close(loss_and_grads(model, prompts, comps, micro, "padded", torch.float32), ref, 1e-5)


def test_tree_size_minimises_flops_per_completion():
    """m* = sqrt(P (6H + P)) / T: long prompts share across the group, long completions split it; the groups'
    completions are cut into even consecutive trees, each with its own copy of the prompt."""
    assert tree_completions(42, 25, 128) == 7         # the embedded task at keep 0: nearly the whole group
    assert tree_completions(60, 5, 128) == 45         # the whole trace in the prompt: any group
    assert tree_completions(100, 1000, 4096) == 2     # long reasoning on a large model: pairs
    assert tree_completions(10, 0, 1) == 13           # empty completions count as length 1
    prompts, comps = [[1, 2, 3]] * 5 + [[4]], [[9] * 4] * 5 + [[8]]
    b = pack(prompts, comps, 0, hidden_size=1)        # m* = round(sqrt(3 * 9) / 4) = 1: one tree per completion
    assert b["prompt_order"] == [0, 1, 2, 3, 4, 5] and int((b["input_ids"] == 1).sum()) == 5
    b = pack(prompts, comps, 0, hidden_size=10)       # m* = round(sqrt(3 * 63) / 4) = 3: trees of 3 and 2
    assert int((b["input_ids"] == 1).sum()) == 2 and sorted(b["prompt_order"]) == [0, 3, 5]


def test_eager_attention_takes_the_mask_as_additive(tok):
    """Eager attention adds the mask to the scores: the boolean mask is turned into 0 / float32-min. Reference:
    the same weights with SDPA, padded (transformers' own eager padded path gives NaN in float64)."""
    eager, sdpa = tiny_llama(len(tok), attn="eager"), tiny_llama(len(tok))
    prompts, comps = rows(len(tok), seed=1)
    micro = SPLITS["groups split"]
    ref = loss_and_grads(sdpa, prompts, comps, micro, "padded", torch.float64)
    assert_close(loss_and_grads(eager, prompts, comps, micro, "packed", torch.float64), ref, F64_TOL)
    assert_close(loss_and_grads(eager, prompts, comps, micro, "packed", torch.float32), ref, 1e-5)


def test_autocast_keeps_the_boolean_mask(tok):
    """Under bfloat16 autocast (the GPU default) the mask stays boolean (an additive one would need the query's
    dtype): packed log-probs stay within 5e-3 of the padded ones, far inside bfloat16's own error against
    float32 here."""
    model = tiny_llama(len(tok))
    prompts, comps = rows(len(tok))
    with torch.no_grad():
        fp32, _ = completion_logprobs(model, collate(prompts, comps, 0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            packed, _ = completion_logprobs(model, pack(prompts, comps, 0))
            padded, _ = completion_logprobs(model, collate(prompts, comps, 0))
    assert (packed - padded).abs().max().item() <= 5e-3 < (padded - fp32).abs().max().item()


def test_logits_path_for_models_with_a_custom_head(tok, monkeypatch):
    """Models whose logits are rescaled after the head take the full-logits path: packed equals padded there too."""
    import rtpo.logprobs as lp

    monkeypatch.setattr(lp, "_has_custom_head", lambda model: True)
    model = embedded(tok)
    prompts, comps = rows(len(tok), seed=2)
    assert_close(loss_and_grads(model, prompts, comps, SPLITS["groups split"], "packed", torch.float64),
                 loss_and_grads(model, prompts, comps, SPLITS["groups split"], "padded", torch.float64), F64_TOL)


def test_padding_never_reaches_the_outputs(tok):
    """Poisoned padding: any pad id gives the same log-probs, entropies and gradients (the mask keeps padding
    out of every real position, and padding positions are never gathered)."""
    model = embedded(tok).double()
    prompts, comps = rows(len(tok), seed=3)
    prompts = prompts[:G] + [prompts[G][:2]] * G + prompts[2 * G:]  # a short tree: its packed row has a padded tail
    outs = []
    for pad in (0, len(tok) - 1):
        model.zero_grad(set_to_none=True)
        batch = pack(prompts, comps, pad)
        assert (batch["input_ids"] == pad).any()
        logp, ent = completion_logprobs(model, batch)
        (logp.sum() + ent.sum()).backward()
        outs.append((logp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]))
    (la, ea, ga), (lb, eb, gb) = outs
    assert torch.equal(la, lb) and torch.equal(ea, eb)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))


def test_pack_shares_each_prompt_and_lays_trees_end_to_end():
    """Layout: one copy of each distinct prompt; a completion sees its prompt and its own earlier tokens, never
    another completion or another tree; positions restart at len(prompt) for each completion; the first
    completion token is predicted from the prompt's last position; a completion's last token takes no
    position (it predicts nothing and nothing else sees it)."""
    prompts = [[1, 2, 3]] * 2 + [[4, 5]] + [[7]]
    comps = [[6, 7], [8, 13], [9, 10, 11, 12], [14]]
    b = pack(prompts, comps, 0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 6, 8], [4, 5, 9, 10, 11], [7, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 3], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    m = b["attention_mask"][:, 0]
    assert m[0, 4].tolist() == [True, True, True, False, True]   # token 8 sees the prompt and itself, not 6
    assert m[0, 3].tolist() == [True, True, True, True, False]
    assert m[0, 2].tolist() == [True, True, True, False, False]  # the prompt is causal
    assert m[2, 1].tolist() == [False, True, False, False, False]  # padding: itself only
    assert b["gather_index"].tolist() == [[2, 3, 0, 0], [2, 4, 0, 0], [6, 7, 8, 9], [10, 0, 0, 0]]
    flat = b["input_ids"].reshape(-1)
    assert flat[b["gather_index"][2]].tolist() == [5, 9, 10, 11]  # each token is predicted by the one before it
    assert b["completion_ids"].tolist() == [[6, 7, 0, 0], [8, 13, 0, 0], [9, 10, 11, 12], [14, 0, 0, 0]]
    assert b["completion_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert b["prompt_order"] == [0, 2, 3]
    assert pack([[7]] + prompts[:3], [[14]] + comps[:3], 0)["prompt_order"] == [1, 3, 0]  # longest trees first
    unshared = pack(prompts, comps, 0, share_prefix=False)
    assert int((unshared["input_ids"] != 0).sum()) == (3 + 1) + (3 + 1) + (2 + 3) + 1  # the prompt copied per row
    with pytest.raises(ValueError, match="at least one token"):
        pack([[]], [[1]], 0)


def test_models_that_cannot_take_a_custom_mask_get_the_padded_layout(tok):
    """Flash-attention kernels take no mask and a sliding window shorter than a row would be ignored:
    make_batch falls back to the padded layout there, and says why."""
    model = tiny_llama(len(tok))
    prompts, comps = rows(len(tok))
    assert "gather_index" in make_batch(model, prompts, comps, 0)
    assert "prompt_len" in make_batch(model, prompts, comps, 0, packing=False)
    model.config._attn_implementation = "flash_attention_2"
    assert "takes no custom mask" in packing_problem(model, 10)
    assert "prompt_len" in make_batch(model, prompts, comps, 0)
    from transformers import Qwen2Config

    class M:
        config = Qwen2Config(sliding_window=8, use_sliding_window=True, max_window_layers=0, num_hidden_layers=2)
    M.config._attn_implementation = "sdpa"
    assert "sliding window of 8" in packing_problem(M, 9) and packing_problem(M, 8) is None


def test_share_prefix_needs_packing():
    cfg = RTPOConfig()
    cfg.optim.packing = False
    with pytest.raises(ConfigError, match="optim.share_prefix = true needs optim.packing = true"):
        cfg.validate()
    cfg.optim.share_prefix = False
    cfg.validate()


def test_row_tokens_count_a_shared_prompt_once_per_run_of_rows():
    p, q = [1, 2, 3], [4, 5]
    prompts, comps = [p, p, q, q, p], [[9] * 2, [9] * 4, [], [9], [9]]
    assert row_tokens(prompts, comps, [0, 1, 2, 3, 4]) == [5, 4, 2, 1, 4]
    assert row_tokens(prompts, comps, [1, 3]) == [7, 3]
    assert row_tokens(prompts, comps, [0, 1, 2], share_prefix=False) == [5, 7, 2]


def test_split_by_tokens_keeps_each_run_under_budget():
    rows, costs = list(range(7)), [3, 3, 3, 9, 1, 1, 4]
    assert split_by_tokens(rows, costs, 6) == [[0, 1], [2], [3], [4, 5, 6]]  # row 3 is over budget: alone
    assert split_by_tokens(rows, costs, 100) == [rows]
    assert split_by_tokens([], [], 5) == []


def test_split_even_gives_exactly_the_asked_runs_with_the_smallest_largest_run():
    rows, costs = list(range(6)), [8, 1, 1, 1, 1, 8]
    runs = split_even(rows, costs, 3)
    assert runs == [[0], [1, 2, 3, 4], [5]]
    assert split_even(rows, [1] * 6, 6) == [[i] for i in rows]
    assert [len(r) for r in split_even(rows, [5] + [0] * 5, 4)] == [1, 2, 1, 2]  # halved by rows to reach 4
    assert sum(split_even(rows, costs, 2), []) == rows
    with pytest.raises(ValueError, match="7 non-empty runs"):
        split_even(rows, costs, 7)
