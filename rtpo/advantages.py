"""Group-relative advantages (GRPO). One scalar per completion, broadcast over its tokens.

Rows are grouped consecutively: completions i*G .. i*G+G-1 belong to prompt i.
"""

from __future__ import annotations

import torch


def _centered(rewards: torch.Tensor, G: int) -> torch.Tensor:
    r = rewards.view(-1, G)
    return r - r.mean(dim=1, keepdim=True)


def scale_group(rewards, G, eps):
    """A_i = (r_i - mean_group) / (std_group + eps)   (unbiased std, as GRPO)"""
    r = rewards.view(-1, G)
    return (_centered(rewards, G) / (r.std(dim=1, keepdim=True) + eps)).view(-1)


def scale_batch(rewards, G, eps):
    """A_i = (r_i - mean_group) / (std over the whole batch + eps)"""
    return (_centered(rewards, G) / (rewards.std() + eps)).view(-1)


def scale_none(rewards, G, eps):
    """A_i = r_i - mean_group   (Dr. GRPO: no std scaling)"""
    return _centered(rewards, G).view(-1)


SCALE_REWARDS = {"group": scale_group, "batch": scale_batch, "none": scale_none}


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards [N] (N = groups * G) -> advantages [N], float32."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return SCALE_REWARDS[scale_rewards](rewards.float(), group_size, eps)


def varied_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards [N] -> [groups] bool: whether a group's G rewards differ (it has a nonzero advantage)."""
    r = rewards.view(-1, group_size)
    return r.max(dim=1).values > r.min(dim=1).values


def zero_variance_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose G rewards are all equal (they carry no learning signal)."""
    return (~varied_groups(rewards, group_size)).float().mean().item()


def all_wrong(accuracy: torch.Tensor) -> torch.Tensor:
    """accuracy [groups, G] in {0, 1} -> [groups] bool: every row of the group is wrong."""
    return accuracy.float().max(dim=1).values <= 0


def group_outcomes(accuracy: torch.Tensor) -> tuple[float, float]:
    """accuracy [groups, G] in {0, 1} -> (fraction of all-wrong groups, fraction of all-right groups).
    An all-wrong group is where a hint can create signal; an all-right group is where it removes it."""
    return all_wrong(accuracy).float().mean().item(), (accuracy.float().min(dim=1).values >= 1).float().mean().item()
