"""Helpers for tests/test_distributed.py (imported by the processes it launches)."""


def digit_reward(completions, answers, **ctx):
    """Share of digits in the completion: varies within almost every group, even for an untrained
    model, so advantages (and gradients) are not zero."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
