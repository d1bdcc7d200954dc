"""Reward functions that inject faults, for tests/test_reliability.py.

Runs name them the way a user names a reward: `--rewards.custom '{"fault_rewards:nan_reward": 1}'`
(tests/ is on sys.path under pytest; subprocesses get it through PYTHONPATH).
"""

import math
import os
import signal
import time

# Set through configure(); `calls` counts training steps (evaluation does not call custom rewards).
state = {"calls": 0, "nan_calls": (), "nan_from": None, "signal_at": None}


def configure(**kw):
    """Reset the call counter; nan_calls = call indices that return NaN, nan_from = NaN from that
    call on, signal_at = the call at which this process sends itself SIGINT."""
    state.update(calls=0, nan_calls=(), nan_from=None, signal_at=None)
    state.update(kw)


def _next_call() -> int:
    i = state["calls"]
    state["calls"] += 1
    return i


def nan_reward(completions, answers, **ctx):
    """NaN for every completion on the configured calls; otherwise a deterministic score of the text,
    so that groups have reward variance and every good step really updates the weights."""
    i = _next_call()
    if i in state["nan_calls"] or (state["nan_from"] is not None and i >= state["nan_from"]):
        return [math.nan] * len(completions)
    return [(sum(map(ord, c)) % 7) / 7 for c in completions]


def sigint_reward(completions, answers, **ctx):
    """0.0 for every completion; on the configured call, first sends this process SIGINT."""
    if _next_call() == state["signal_at"]:
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does, at a known point of a step
    return [0.0] * len(completions)


def sigint_twice_reward(completions, answers, **ctx):
    """0.0 for every completion; on the configured call, sends this process SIGINT twice (an
    impatient Ctrl-C Ctrl-C)."""
    if _next_call() == state["signal_at"]:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    return [0.0] * len(completions)


def slow_zero(completions, answers, **ctx):
    """Sleeps RTPO_TEST_REWARD_SLEEP seconds: gives a test a window to signal a running train.py."""
    time.sleep(float(os.environ.get("RTPO_TEST_REWARD_SLEEP", "0") or 0))
    return [0.0] * len(completions)


def raising_reward(completions, answers, **ctx):
    """Raises on the second training step (call 1), like a user function with a bug."""
    if _next_call() == 1:
        raise KeyError("missing_field")
    return [0.0] * len(completions)
