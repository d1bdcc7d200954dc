"""Group-relative advantages against a float64 reference written here."""

import statistics

import pytest
import torch

from rtpo.advantages import group_advantages, zero_variance_fraction


def reference(rewards, G, scale, eps):
    out = []
    batch_std = statistics.stdev(rewards)
    for g in range(0, len(rewards), G):
        grp = rewards[g:g + G]
        mean, std = statistics.fmean(grp), statistics.stdev(grp)
        for r in grp:
            if scale == "group":
                out.append((r - mean) / (std + eps))
            elif scale == "batch":
                out.append((r - mean) / (batch_std + eps))
            else:
                out.append(r - mean)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [2, 4, 8])
def test_advantages_match_reference(scale, G):
    """Each scale_rewards mode equals the formula of RTPO.md section 1 within 1e-6."""
    g = torch.Generator().manual_seed(G)
    r = torch.rand(5 * G, generator=g, dtype=torch.float64)
    want = reference(r.tolist(), G, scale, 1e-4)
    got = group_advantages(r.float(), G, scale, 1e-4)
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-6)


def test_advantages_sum_to_zero_per_group_and_equal_rewards_give_zero():
    """Within each group the advantages sum to 0; a group of equal rewards gets all zeros."""
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, 4, "group")
    assert torch.allclose(a.view(2, 4).sum(1), torch.zeros(2), atol=1e-6)
    assert torch.equal(a[4:], torch.zeros(4))
    assert zero_variance_fraction(r, 4) == 0.5


def test_groups_must_divide():
    """A reward count that is not a multiple of G is an error, not a silent misgrouping."""
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_group_outcomes_split_zero_variance_groups_into_all_wrong_and_all_right():
    from rtpo.advantages import group_outcomes

    acc = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.float32)
    assert group_outcomes(acc) == (0.5, 0.25)
