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
