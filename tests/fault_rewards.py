"""Reward functions that inject faults, for tests/test_reliability.py.

Runs name them the way a user names a reward: `--rewards.custom '{"fault_rewards:nan_update": 1}'`
(tests/ is on sys.path under pytest; subprocesses get it through PYTHONPATH).
"""

import math
import os
import signal
import sys
import time

import torch

# Set through configure(); `calls` counts training steps (evaluation does not call custom rewards).
state = {"calls": 0, "nan_calls": (), "nan_from": None, "signal_at": None, "bad": None, "hook": None}


def configure(**kw):
    """Reset the call counter; nan_calls = calls after which the update's forward pass is NaN,
    nan_from = NaN from that call on, signal_at = the call at which this process sends itself SIGINT,
    bad = what contract_breaker returns on call 1."""
    _nan_forward(False)
    state.update(calls=0, nan_calls=(), nan_from=None, signal_at=None, bad=None)
    state.update(kw)


def _nan_forward(on: bool) -> None:
    """On: every module's output in a grad-enabled forward (the update; rollouts and evaluation run
    without grad) becomes NaN, as diverged weights would make it, so that step's loss is NaN."""
    if state.get("hook") is not None:
        state["hook"].remove()
        state["hook"] = None
    if on:
        def nan_out(module, args, out):
            if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.is_floating_point():
                return out * math.nan
            return None

        state["hook"] = torch.nn.modules.module.register_module_forward_hook(nan_out)


def _next_call() -> int:
    i = state["calls"]
    state["calls"] += 1
    return i


def nan_update(completions, answers, **ctx):
    """A deterministic score of the text, so that groups have reward variance and every good step
    really updates the weights; on the configured calls, that step's update computes NaN (its
    forward pass outputs NaN: a non-finite loss that no reward caused)."""
    i = _next_call()
    _nan_forward(i in state["nan_calls"] or (state["nan_from"] is not None and i >= state["nan_from"]))
    return [(sum(map(ord, c)) % 7) / 7 for c in completions]


BAD_RETURNS = {  # what a reward function may not return (or do), by name; n = the number of completions
    "dict": lambda n: {i: 1.0 for i in range(n)},
    "numeric_strings": lambda n: ["0.5"] * n,
    "string": lambda n: "0.5",
    "one_too_few": lambda n: [0.0] * (n - 1),
    "nan": lambda n: [0.0] * (n - 1) + [math.nan],
    "inf": lambda n: [math.inf] * n,
    "beyond_float32": lambda n: [1e39] * n,
    "nested_lists": lambda n: [[0.0]] * n,
    "generator": lambda n: (0.0 for _ in range(n)),
    "sys_exit_0": lambda n: sys.exit(0),
    "keyboard_interrupt": lambda n: (_ for _ in ()).throw(KeyboardInterrupt()),
}


def contract_breaker(completions, answers, **ctx):
    """A good reward on call 0, then BAD_RETURNS[state["bad"]] on call 1 (the second training step)."""
    n = len(completions)
    if _next_call() == 1 and state["bad"]:
        return BAD_RETURNS[state["bad"]](n)
    return [(sum(map(ord, c)) % 7) / 7 for c in completions]


def no_reward(completions, answers, **ctx):
    """The documented "no reward": None for the whole call on even calls, None for some entries on odd ones."""
    if _next_call() % 2 == 0:
        return None
    return [None if i % 2 else 1.0 for i in range(len(completions))]


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
