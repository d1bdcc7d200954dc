"""The policy loss against a float64 reference written independently here."""

import math

import pytest
import torch

from rtpo.losses import LOSS_TYPES, k3_kl, policy_loss


def reference_loss(logp, old, adv, mask, ref, loss_type, el, eh, beta, max_len):
    """Plain Python loops in float64: the formulas of RTPO.md section 1, token by token."""
    B, T = len(logp), len(logp[0])
    per_seq_sum, per_seq_n, total, n = [], [], 0.0, 0
    for i in range(B):
        s, c = 0.0, 0
        for t in range(T):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(rho, 1 - el), 1 + eh)
            lt = -min(rho * adv[i], clipped * adv[i])
            if beta:
                d = ref[i][t] - logp[i][t]
                lt += beta * (math.exp(d) - d - 1)
            s += lt
            c += 1
        per_seq_sum.append(s)
        per_seq_n.append(c)
        total += s
        n += c
    if loss_type == "grpo":
        return sum(s / max(c, 1) for s, c in zip(per_seq_sum, per_seq_n)) / B
    if loss_type == "dapo":
        return total / n
    return total / (B * max_len)


def _inputs(seed, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_float64_reference(loss_type, beta, seed):
    """Each loss_type, with and without KL, equals the loop reference within 1e-6 (float32 inputs)."""
    logp, old, ref, adv, mask = _inputs(seed)
    want = reference_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), ref.tolist(),
                          loss_type, 0.2, 0.28, beta, max_len=9)
    got, _ = policy_loss(logp.float(), old.float(), adv.float(), mask.float(), loss_type=loss_type,
                         eps_low=0.2, eps_high=0.28, beta=beta, ref_logp=ref.float(), max_len=9)
    assert abs(got.item() - want) < 1e-6 * max(1.0, abs(want))


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_poisoned_padding_changes_nothing(loss_type):
    """Padding positions holding huge values, inf or nan change neither loss nor the gradient of
    real tokens."""
    logp, old, ref, adv, mask = [x.float() for x in _inputs(3)]
    results = []
    for poison in (None, 1e4, float("inf"), float("nan")):
        lp, o, r = logp.clone(), old.clone(), ref.clone()
        if poison is not None:
            pad = mask == 0
            lp[pad], o[pad], r[pad] = poison, -poison if poison == poison else poison, poison
        lp.requires_grad_(True)
        loss, _ = policy_loss(lp, o, adv, mask, loss_type=loss_type, beta=0.04, ref_logp=r, max_len=7)
        loss.backward()
        results.append((loss.item(), lp.grad[mask.bool()].clone()))
    for loss, grad in results[1:]:
        assert loss == results[0][0]
        assert torch.equal(grad, results[0][1])


def test_micro_batches_sum_to_full_batch():
    """Splitting a batch into micro batches with the batch's normalizers gives the same loss and
    gradient as the whole batch (gradient accumulation is exact) for every loss_type."""
    logp, old, ref, adv, mask = [x.float() for x in _inputs(4, B=6)]
    for lt in LOSS_TYPES:
        full_lp = logp.clone().requires_grad_(True)
        full, _ = policy_loss(full_lp, old, adv, mask, loss_type=lt, max_len=7)
        full.backward()
        part_lp = logp.clone().requires_grad_(True)
        n_tok = int(mask.sum())
        total = 0
        for sl in (slice(0, 2), slice(2, 6)):
            l, _ = policy_loss(part_lp[sl], old[sl], adv[sl], mask[sl], loss_type=lt, n_seqs=6, n_tokens=n_tok, max_len=7)
            l.backward()
            total += l.item()
        assert abs(total - full.item()) < 1e-6
        assert torch.allclose(part_lp.grad, full_lp.grad, atol=1e-7)


def test_on_policy_gradient_is_advantage_weighted_logprob():
    """With old = logp.detach() the ratio is 1 and the token-mean loss gradient is -A_i / n_tokens."""
    logp, _, _, adv, mask = [x.float() for x in _inputs(5)]
    lp = logp.clone().requires_grad_(True)
    loss, st = policy_loss(lp, lp.detach(), adv, mask, loss_type="dapo")
    loss.backward()
    want = -(adv[:, None] * mask) / mask.sum()
    assert torch.allclose(lp.grad, want, atol=1e-7)
    assert st["clipped_tokens"].item() == 0


def test_clip_asymmetric_bounds():
    """A positive advantage stops being pushed once rho > 1 + eps_high; a negative one once rho < 1 - eps_low."""
    lp = torch.tensor([[math.log(1.5)], [math.log(0.5)]], requires_grad=True)
    old = torch.zeros(2, 1)
    loss, st = policy_loss(lp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1), loss_type="dapo",
                           eps_low=0.2, eps_high=0.28)
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(2, 1))
    assert st["clipped_tokens"].item() == 2


def test_k3_kl_nonnegative_and_zero_at_equality():
    """k3 >= 0 everywhere and 0 when the policy equals the reference."""
    a = torch.randn(1000)
    b = torch.randn(1000)
    assert (k3_kl(a, b) >= 0).all()
    assert torch.equal(k3_kl(a, a), torch.zeros(1000))


@pytest.mark.parametrize("seed", [0, 1])
def test_hint_nll_is_the_mean_negative_loglik_of_hint_tokens(seed):
    """hint_nll = -mean of log-probs over masked tokens, against a float64 loop; padding poisoned with
    inf/nan changes nothing; an empty mask gives 0."""
    from rtpo.losses import hint_nll

    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(4, 6, generator=g) > 0.4).float()
    mask[0, 0] = 1
    want = -sum(logp[i, t].item() for i in range(4) for t in range(6) if mask[i, t]) / mask.sum().item()
    poisoned = logp.clone()
    poisoned[mask == 0] = float("nan")
    poisoned[(mask == 0) & (torch.arange(6) % 2 == 0)] = float("-inf")
    assert hint_nll(poisoned.float(), mask).item() == pytest.approx(want, rel=1e-6)
    assert hint_nll(logp, torch.zeros_like(mask)).item() == 0.0


# --- GSPO (sequence-level importance ratio) and truncated importance sampling ----------------------

def reference_gspo(logp, old, adv, mask, loss_type, el, eh, max_len):
    """GSPO's sequence objective in float64 loops: s_i = exp(mean_t(logp - old)) over i's tokens,
    per-sequence loss -min(s_i A_i, clip(s_i) A_i) on each of its tokens, then the loss_type's
    aggregation (with grpo this is the paper's -1/G sum_i min(s_i A_i, clip(s_i) A_i))."""
    B, T = len(logp), len(logp[0])
    per_seq, counts = [], []
    for i in range(B):
        toks = [t for t in range(T) if mask[i][t]]
        s = math.exp(sum(logp[i][t] - old[i][t] for t in toks) / max(len(toks), 1))
        per_seq.append(-min(s * adv[i], min(max(s, 1 - el), 1 + eh) * adv[i]))
        counts.append(len(toks))
    if loss_type == "grpo":
        return sum(l for l, c in zip(per_seq, counts) if c) / B
    total = sum(l * c for l, c in zip(per_seq, counts))
    return total / sum(counts) if loss_type == "dapo" else total / (B * max_len)


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_matches_float64_sequence_reference(loss_type, seed):
    """importance=sequence equals the float64 GSPO reference within 1e-6 (float32 inputs), with
    GSPO's small clip range 3e-4 / 4e-4 (most sequences clipped) and a wide one (none clipped)."""
    logp, old, _, adv, mask = _inputs(seed)
    old = logp + 0.01 * (old - logp)  # GSPO's sequence ratios sit near 1
    for el, eh in ((3e-4, 4e-4), (0.5, 0.5)):
        want = reference_gspo(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), loss_type, el, eh, 9)
        got, _ = policy_loss(logp.float(), old.float(), adv.float(), mask.float(), loss_type=loss_type,
                             eps_low=el, eps_high=eh, max_len=9, importance="sequence")
        assert abs(got.item() - want) < 1e-6 * max(1.0, abs(want))


def test_gspo_token_form_has_the_sequence_objectives_gradient():
    """With loss_type grpo, the gradient of the token-level form (s_it = sg[s_i] pi_t / sg[pi_t])
    equals, in float64, autograd's gradient of the paper's sequence objective
    -1/B sum_i min(s_i A_i, clip(s_i) A_i) with s_i a differentiable function of the log-probs."""
    logp, old, _, adv, mask = _inputs(7)
    old = logp + 0.05 * (old - logp)
    lp = logp.clone().requires_grad_(True)
    got, _ = policy_loss(lp, old, adv, mask, loss_type="grpo", eps_low=0.02, eps_high=0.03, importance="sequence")
    got.backward()
    lp2 = logp.clone().requires_grad_(True)
    s = torch.exp(((lp2 - old) * mask).sum(-1) / mask.sum(-1))
    want = -torch.min(s * adv, torch.clamp(s, 1 - 0.02, 1 + 0.03) * adv).mean()
    want.backward()
    assert abs(got.item() - want.item()) < 1e-12
    assert torch.allclose(lp.grad, lp2.grad * mask, atol=1e-12)
    assert lp.grad.abs().sum() > 0  # not everything clipped


def test_gspo_hand_computed_example():
    """One sequence of 2 tokens with logp - old = (0.1, 0.3): s = e^0.2 = 1.22140. With A = 1 and
    eps_high 0.28 it is unclipped: loss -1.22140, d loss / d logp_t = -s / 2 = -0.61070 (grpo); with
    eps_high 0.2 it is clipped at 1.2: loss -1.2, gradient 0; with A = -1: loss +1.22140, gradient
    +0.61070 (the lower clip does not bind above 1)."""
    old = torch.zeros(1, 2, dtype=torch.float64)
    for adv, eh, loss_want, grad_want in ((1.0, 0.28, -1.2214028, -0.6107014), (1.0, 0.2, -1.2, 0.0),
                                          (-1.0, 0.2, 1.2214028, 0.6107014)):
        lp = torch.tensor([[0.1, 0.3]], dtype=torch.float64, requires_grad=True)
        loss, st = policy_loss(lp, old, torch.tensor([adv], dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64),
                               loss_type="grpo", eps_low=0.2, eps_high=eh, importance="sequence")
        loss.backward()
        assert loss.item() == pytest.approx(loss_want, abs=1e-7)
        assert lp.grad[0].tolist() == pytest.approx([grad_want, grad_want], abs=1e-7)
        assert st["clipped_tokens"].item() == (2 if grad_want == 0 else 0)


def test_gspo_on_policy_equals_token_level():
    """On-policy (old = logp.detach()) s_i = 1, so GSPO's loss and gradient equal the token ratio's."""
    logp, _, _, adv, mask = [x.float() for x in _inputs(8)]
    grads = []
    for imp in ("token", "sequence"):
        lp = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(lp, lp.detach(), adv, mask, loss_type="dapo", importance=imp)
        loss.backward()
        grads.append((loss.item(), lp.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-7) and torch.allclose(grads[0][1], grads[1][1], atol=1e-7)


def reference_tis(logp, old, rollout, adv, mask, level, cap, el, eh):
    """dapo loss with truncated importance weights, float64 loops: w = min(pi_old / pi_rollout, cap)
    per token, or min(prod_t pi_old / pi_rollout, cap) per sequence, on the clipped surrogate."""
    total, n = 0.0, 0
    for i in range(len(logp)):
        toks = [t for t in range(len(logp[0])) if mask[i][t]]
        seq_w = min(math.exp(sum(old[i][t] - rollout[i][t] for t in toks)), cap)
        for t in toks:
            w = seq_w if level == "sequence" else min(math.exp(old[i][t] - rollout[i][t]), cap)
            rho = math.exp(logp[i][t] - old[i][t])
            total += -w * min(rho * adv[i], min(max(rho, 1 - el), 1 + eh) * adv[i])
            n += 1
    return total / n


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("seed", [0, 1])
def test_tis_matches_float64_reference(level, seed):
    """policy_loss with tis_cap weights the clipped surrogate by the truncated ratio of the old
    policy to the rollout's own log-probs, as the float64 reference does (within 1e-6)."""
    logp, old, rollout, adv, mask = _inputs(seed)
    rollout = old + (rollout - logp)  # the sampler's numerics differ from the trainer's by ~0.5 nats
    want = reference_tis(logp.tolist(), old.tolist(), rollout.tolist(), adv.tolist(), mask.tolist(), level, 1.2,
                         0.2, 0.28)
    got, st = policy_loss(logp.float(), old.float(), adv.float(), mask.float(), loss_type="dapo", eps_low=0.2,
                          eps_high=0.28, rollout_logp=rollout.float(), tis_cap=1.2, tis_level=level)
    assert abs(got.item() - want) < 1e-6 * max(1.0, abs(want))
    assert 0 < st["tis_truncated_tokens"].item() < mask.sum().item()


def test_tis_hand_computed_example():
    """old - rollout = (ln 3, ln 0.5) with cap 2: token weights (2, 0.5), one truncated token; the
    sequence weight is min(3 * 0.5, 2) = 1.5 on both. On-policy with A = 1 the dapo loss is
    -mean(w): -1.25 (token) and -1.5 (sequence); its gradient is -w / 2 per token."""
    old = torch.tensor([[math.log(0.3), math.log(0.2)]], dtype=torch.float64)
    rollout = old - torch.tensor([[math.log(3.0), math.log(0.5)]], dtype=torch.float64)
    for level, w in (("token", [2.0, 0.5]), ("sequence", [1.5, 1.5])):
        lp = old.clone().requires_grad_(True)
        loss, st = policy_loss(lp, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64),
                               loss_type="dapo", rollout_logp=rollout, tis_cap=2.0, tis_level=level)
        loss.backward()
        assert loss.item() == pytest.approx(-sum(w) / 2, abs=1e-12)
        assert lp.grad[0].tolist() == pytest.approx([-w[0] / 2, -w[1] / 2], abs=1e-12)
        assert st["tis_truncated_tokens"].item() == (1 if level == "token" else 0)


def test_tis_weight_is_one_when_rollout_numerics_agree_and_kl_is_not_weighted():
    """rollout log-probs equal to the old ones give weight 1: the loss equals the plain loss, also
    with a KL term (which TIS never weights)."""
    logp, old, ref, adv, mask = [x.float() for x in _inputs(9)]
    plain, _ = policy_loss(logp, old, adv, mask, beta=0.1, ref_logp=ref)
    tis, st = policy_loss(logp, old, adv, mask, beta=0.1, ref_logp=ref, rollout_logp=old.clone(), tis_cap=2.0)
    assert tis.item() == pytest.approx(plain.item(), abs=1e-7)
    assert st["tis_weight_sum"].item() == pytest.approx(mask.sum().item()) and st["logp_gap_sum"].item() == 0


def test_tis_sequence_weight_never_overflows():
    """A long sequence whose summed log-ratio is huge is capped in log space: weight = cap, finite."""
    from rtpo.losses import tis_weights

    old, rollout, mask = torch.zeros(1, 4000), torch.full((1, 4000), -1.0), torch.ones(1, 4000)
    w = tis_weights(old, rollout, mask, 2.0, "sequence")
    assert torch.isfinite(w).all() and torch.allclose(w, torch.full_like(w, 2.0))


@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_poisoned_padding_changes_nothing_with_gspo_and_tis(importance):
    """inf/nan in padding positions of logp, old, rollout log-probs change neither the GSPO/TIS loss
    nor the gradient of real tokens."""
    logp, old, rollout, adv, mask = [x.float() for x in _inputs(10)]
    results = []
    for poison in (None, float("inf"), float("nan")):
        lp, o, r = logp.clone(), old.clone(), rollout.clone()
        if poison is not None:
            pad = mask == 0
            lp[pad], o[pad], r[pad] = poison, -poison if poison == poison else poison, poison
        lp.requires_grad_(True)
        loss, _ = policy_loss(lp, o, adv, mask, loss_type="grpo", importance=importance, rollout_logp=r,
                              tis_cap=2.0, tis_level="sequence")
        loss.backward()
        results.append((loss.item(), lp.grad[mask.bool()].clone()))
    for loss, grad in results[1:]:
        assert loss == results[0][0] and torch.equal(grad, results[0][1])


def test_importance_registry_and_config_accept_the_same_names():
    """loss.importance accepts exactly the registry's keys; a wrong one is a ConfigError naming it."""
    from rtpo.config import ConfigError
    from rtpo.cli import parse_args
    from rtpo.losses import IMPORTANCE

    assert sorted(IMPORTANCE) == ["sequence", "token"]
    assert parse_args(["--loss.importance", "sequence", "--loss.tis_cap", "2"]).loss.importance == "sequence"
    with pytest.raises(ConfigError, match="loss.importance = 'seq'"):
        parse_args(["--loss.importance", "seq"])


def test_hint_tokens_kept_is_the_ceiling_of_the_fraction():
    from rtpo.losses import hint_tokens_kept

    assert [hint_tokens_kept(h, 0.2) for h in (0, 1, 5, 6, 10, 11)] == [0, 1, 1, 2, 2, 3]
    assert hint_tokens_kept(7, 1.0) == 7 and hint_tokens_kept(7, 0.0) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hint_token_mask_keeps_the_highest_entropy_hint_tokens_only(seed):
    """Prefix-RFT's choice: of each row's first h (hint) positions only the ceil(top * h) highest-entropy stay
    on, found by a brute-force reference; positions after the hint and rows without one are untouched,
    padding (mask 0) never turns on, whatever its (poisoned) entropy."""
    from rtpo.losses import hint_token_mask, hint_tokens_kept

    g = torch.Generator().manual_seed(seed)
    B, T, top = 4, 12, 0.3
    mask = torch.ones(B, T)
    mask[:, 9:] = 0  # padding
    entropy = torch.rand(B, T, generator=g)
    entropy[:, 9:] = 1e6  # poisoned padding
    hint_lens = [0, 3, 7, 9]
    out = hint_token_mask(mask, entropy, hint_lens, top)
    for b, h in enumerate(hint_lens):
        k = hint_tokens_kept(h, top)
        chosen = sorted(range(h), key=lambda t: -entropy[b, t].item())[:k]
        want = [1.0 if (t >= h and t < 9) or t in chosen else 0.0 for t in range(T)]
        assert out[b].tolist() == want, (b, h)
    assert torch.equal(hint_token_mask(mask, entropy, hint_lens, 1.0), mask)
