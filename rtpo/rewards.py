"""Reward functions: answer accuracy, format, length penalty, and user functions.

Every reward function has one signature and returns one float per completion:

    fn(completions: list[str], answers: list[str], **ctx) -> list[float]

ctx holds `responses` (the assistant's whole response: injected hint + completion), `questions`,
`finish_reasons` ("eos" | "stop" | "length"), `completion_lengths`, `max_new_tokens`,
`think_open` and `think_close`. User functions are imported only from an explicit
"module:function" in the config; nothing from data is ever evaluated.
"""

from __future__ import annotations

import importlib
import math
import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def final_answer_text(response: str, think_close: str = "</think>") -> str:
    """The part of a response that states the answer: after the last think_close, if any."""
    return response.rpartition(think_close)[2] if think_close in response else response


def extract_answer(text: str):
    """The stated answer: \\boxed{...}, else after '####' or 'answer is', else the last number."""
    m = _BOXED.findall(text)
    if m:
        return m[-1].strip()
    for marker in ("####", "answer is", "Answer:"):
        if marker in text:
            tail = text.rpartition(marker)[2]
            nums = _NUMBER.findall(tail)
            return nums[0] if nums else tail.strip().rstrip(".")
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def parse_number(s):
    if s is None:
        return None
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def answers_match(pred, gold: str) -> bool:
    """Numeric comparison when both parse as numbers (72 == 72.0 == 72.00, '1,000' == 1000), else
    whitespace- and case-normalised string equality."""
    if pred is None:
        return False
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return " ".join(pred.split()).lower() == " ".join(gold.split()).lower()


def accuracy_reward(completions, answers, *, responses=None, think_close="</think>", **ctx):
    """1.0 if the answer stated after the reasoning equals the gold answer, else 0.0."""
    responses = responses or completions
    return [float(answers_match(extract_answer(final_answer_text(r, think_close)), a))
            for r, a in zip(responses, answers)]


def format_reward(completions, answers, *, responses=None, think_open="<think>", think_close="</think>",
                  finish_reasons=None, **ctx):
    """1.0 for `<think> ... </think> answer` with one closed reasoning block, a non-empty answer
    and a natural end (EOS/stop, not the length limit)."""
    responses = responses or completions
    finish_reasons = finish_reasons or ["eos"] * len(responses)
    out = []
    for r, fr in zip(responses, finish_reasons):
        r = r.strip()
        ok = (r.startswith(think_open) and r.count(think_close) == 1 and r.count(think_open) == 1
              and final_answer_text(r, think_close).strip() != "" and fr != "length")
        out.append(float(ok))
    return out


def length_penalty(completions, answers, *, completion_lengths=None, max_new_tokens=1, **ctx):
    """-(completion tokens / max_new_tokens): a push towards shorter completions."""
    return [-float(n) / max_new_tokens for n in completion_lengths]


BUILTIN = {"accuracy": accuracy_reward, "format": format_reward, "length_penalty": length_penalty}


def import_function(path: str):
    """Import "package.module:function"; errors name the path and what failed."""
    mod_name, sep, fn_name = path.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"reward function {path!r} must be written 'module:function'")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise ValueError(f"reward function {path!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward function {path!r}: module {mod_name!r} has no function {fn_name!r}")
    return fn


def build_reward_functions(rc) -> dict:
    """name -> (function, weight), for the non-zero weights of a RewardConfig."""
    fns = {}
    for name in BUILTIN:
        w = getattr(rc, name)
        if w:
            fns[name] = (BUILTIN[name], float(w))
    for path, w in rc.custom.items():
        if w:
            fns[path] = (import_function(path), float(w))
    return fns


class RewardError(ValueError):
    """A reward function failed or returned the wrong number of values; the message names it."""


def score(fns: dict, completions, answers, **ctx):
    """Weighted sum of every reward function -> (total [N], {name: list[float]}).
    A function that returns the wrong number of values is an error naming it."""
    per_fn, total = {}, [0.0] * len(completions)
    for name, (fn, w) in fns.items():
        try:
            vals = [float(v) for v in fn(completions, answers, **ctx)]
        except Exception as e:  # user code: report which function failed, not a bare traceback
            raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
        if len(vals) != len(completions):
            raise RewardError(f"reward function {name!r} returned {len(vals)} values for {len(completions)} completions")
        per_fn[name] = vals
        total = [t + w * v for t, v in zip(total, vals)]
    return total, per_fn
