"""Reward functions: answer accuracy, format, length penalty, strict answer formats, and user functions.

Every reward function returns one float per completion and is called with ONE signature:

    fn(completions, *, prompts, answers, completion_ids, **columns) -> list[float]

All arguments are lists aligned with `completions` (row i of each list belongs to completion i),
except the few scalars noted:

- `completions`: the generated text (special tokens kept, the final EOS dropped);
- `prompts`: the prompt text the model saw (chat template and injected hint included);
- `answers`: the gold answer of each row (after `data.format` parsing);
- `completion_ids`: the generated token ids (the EOS, when one was generated, included);
- `responses`: the assistant's whole response: injected hint (prefix mode) + completion;
- `questions`, `finish_reasons` ("eos" | "stop" | "length"), `completion_lengths`, `keeps` (the
  hint fraction each row was prompted with), and the scalars `max_new_tokens`, `think_open`,
  `think_close`, `step`;
- every column of the dataset row by its own name (e.g. `difficulty`, `solution`, `answer`):
  one value per completion, for rows from any source (local file, hub dataset, generated task).

The return value is checked (`check_rewards`): exactly one real number per completion, each finite;
`None` (for the whole call or for one entry) is "no reward" and adds 0. A dict, strings (even
"0.5"), the wrong length, NaN / inf, or SystemExit / KeyboardInterrupt raised inside the function
stop the run with one error line naming the function (exit 3).

A function takes what it names: `def f(completions, *, answers, difficulty, **kw)`; without a
`**kwargs` parameter it is passed only the names it declares. The older form
`fn(completions, answers, **ctx)` still works (`answers` is passed by keyword, or positionally to
a function whose second parameter has another name). User functions are imported only from an
explicit "module:function" in the config; nothing from data is ever evaluated.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_JSON_BLOCK = re.compile(r"```json\s*(\{.*?\})\s*```", re.DOTALL)


def final_answer_text(response: str, think_close: str = "</think>") -> str:
    """The part of a response that states the answer: after the last think_close, if any."""
    return response.rpartition(think_close)[2] if think_close in response else response


def last_boxed(text: str):
    """The content of the last \\boxed{...} in text, nested braces included (\\boxed{\\frac{1}{2}}
    gives \\frac{1}{2}); None if there is none or it is never closed."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i, depth = start + len("\\boxed{"), 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
        start = text.rfind("\\boxed{", 0, start)  # unclosed: an earlier complete one still counts
    return None


def extract_answer(text: str):
    """The stated answer: \\boxed{...}, else after '####' or 'answer is', else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
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


def boxed_reward(completions, answers, *, responses=None, think_close="</think>", **ctx):
    """1.0 if the last \\boxed{...} after the reasoning holds the gold answer (numeric-aware,
    nested braces allowed), else 0.0: the MATH / DeepSeek-R1 convention, strict (no fallback)."""
    responses = responses or completions
    return [float(answers_match(last_boxed(final_answer_text(r, think_close)), a)) for r, a in zip(responses, answers)]


def gsm8k_reward(completions, answers, *, responses=None, think_close="</think>", **ctx):
    """1.0 if the first number after the last '####' after the reasoning equals the gold answer
    (GSM8K's "#### 72" convention), else 0.0; no '####' scores 0."""
    responses = responses or completions
    out = []
    for r, a in zip(responses, answers):
        text = final_answer_text(r, think_close)
        nums = _NUMBER.findall(text.rpartition("####")[2]) if "####" in text else []
        out.append(float(answers_match(nums[0] if nums else None, a)))
    return out


def json_answer(text: str):
    """The "answer" value of the last ```json {...}``` block in text (as a string), or None when
    there is no block, it does not parse, it is not an object or it has no "answer" key."""
    for block in reversed(_JSON_BLOCK.findall(text)):
        try:
            obj = json.loads(block)
        except ValueError:
            continue
        if isinstance(obj, dict) and "answer" in obj:
            v = obj["answer"]
            return v if isinstance(v, str) else json.dumps(v)
        return None
    return None


def json_answer_reward(completions, answers, *, responses=None, think_close="</think>", **ctx):
    """The original RTPO work's answer block: the response ends with ```json {"answer": "X"}```.
    1.0 if its answer equals the gold one (numeric-aware, case- and space-insensitive), 0.5 for a
    well-formed block with a wrong answer, 0.0 without one (the original's 2 / 1 / 0, halved)."""
    responses = responses or completions
    out = []
    for r, a in zip(responses, answers):
        pred = json_answer(final_answer_text(r, think_close))
        out.append(0.0 if pred is None else 1.0 if answers_match(pred, a) else 0.5)
    return out


BUILTIN = {"accuracy": accuracy_reward, "format": format_reward, "length_penalty": length_penalty,
           "boxed": boxed_reward, "gsm8k": gsm8k_reward, "json_answer": json_answer_reward}
# Argument names the trainer passes to every reward function; a dataset column of the same name is
# not passed (the trainer warns once at setup).
RESERVED = frozenset({"completions", "prompts", "answers", "completion_ids", "responses", "questions",
                      "finish_reasons", "completion_lengths", "keeps", "max_new_tokens", "think_open",
                      "think_close", "step"})


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


def _signature(fn):
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have none: pass everything
        return None


def _answers_slot(params):
    """The parameter that receives the answers: the one named `answers`, else the first positional
    parameter after the completions (the older `fn(completions, golds, **ctx)` form), else None."""
    rest = params[1:]
    named = next((p for p in rest if p.name == "answers" and p.kind is not p.POSITIONAL_ONLY), None)
    return named or next((p for p in rest if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), None)


def call_reward(fn, completions, answers, kwargs: dict):
    """fn(completions, answers=..., **kwargs), adapted to what fn declares: `answers` goes by keyword
    when fn names it, else positionally as the second argument if fn takes one; without a
    **kwargs parameter, fn receives only the keyword arguments it names."""
    sig = _signature(fn)
    if sig is None:
        return fn(completions, answers=answers, **kwargs)
    params = list(sig.parameters.values())
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    slot = _answers_slot(params)
    named = {p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    kw = {k: v for k, v in kwargs.items() if (var_kw or k in named) and (slot is None or k != slot.name)}
    if slot is not None and slot.name != "answers":
        return fn(completions, answers, **kw)
    if slot is not None or var_kw:
        kw["answers"] = answers
    return fn(completions, **kw)


def missing_arguments(fn, available) -> list:
    """Parameters fn requires (no default) that nothing would fill: not the answers, and not in
    `available` (the names the trainer passes plus the dataset's columns). Checked at setup."""
    sig = _signature(fn)
    if sig is None:
        return []
    params = list(sig.parameters.values())
    slot = _answers_slot(params)
    return [p.name for p in params[1:] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p is not slot and (p.kind is p.POSITIONAL_ONLY or p.name not in available)]


_F32_MAX = 3.4028234663852886e38  # rewards become float32 tensors: a larger value is inf there


def check_rewards(name: str, out, n: int) -> list:
    """The contract of a reward function's return value: a sequence (list, tuple, 1-d array or tensor)
    of exactly n real numbers (bool, int or float; numpy/torch scalars too), each finite (as float32,
    the dtype advantages are computed in), or None. None, for the whole return or for one entry, is
    "no reward": it adds 0. Anything else (a dict, a string such as "0.5", a generator, NaN, inf, the
    wrong length) raises RewardError naming the function, the entry and what it was."""
    if out is None:
        return [0.0] * n
    if hasattr(out, "tolist") and not isinstance(out, (str, bytes)):  # numpy array / torch tensor
        if getattr(out, "ndim", 1) != 1:
            raise RewardError(f"reward function {name!r} returned an array of shape {tuple(out.shape)}; "
                              f"return one number per completion ({n})")
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward function {name!r} returned {type(out).__name__} {_short(out)}; return a list of "
                          f"{n} numbers (one per completion) or None for no reward")
    if len(out) != n:
        raise RewardError(f"reward function {name!r} returned {len(out)} values for {n} completions")
    vals = []
    for i, v in enumerate(out):
        if v is None:
            vals.append(0.0)
            continue
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 and not isinstance(v, (str, bytes)):
            v = v.item()  # a numpy or torch scalar
        if not isinstance(v, (bool, int, float)):
            raise RewardError(f"reward function {name!r} returned {type(v).__name__} {_short(v)} at index {i}; "
                              "every value must be a number (or None for no reward)")
        f = float(v)
        if not math.isfinite(f) or abs(f) > _F32_MAX:
            raise RewardError(f"reward function {name!r} returned {f!r} at index {i}; rewards must be finite numbers")
        vals.append(f)
    return vals


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def score(fns: dict, completions, answers, **ctx):
    """Weighted sum of every reward function -> (total [N], {name: list[float]}).
    Each function is called through `call_reward` with `ctx` as keyword arguments. A function that
    raises (SystemExit and a user's KeyboardInterrupt included), or whose return breaks the contract of
    `check_rewards`, is a RewardError naming it."""
    per_fn, total = {}, [0.0] * len(completions)
    for name, (fn, w) in fns.items():
        try:
            out = call_reward(fn, completions, answers, ctx)
        except (Exception, SystemExit) as e:  # user code: report which function failed, not a bare traceback
            what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if isinstance(e, SystemExit):
                what = f"SystemExit({e.code!r}) (sys.exit / exit() inside a reward function)"
            raise RewardError(f"reward function {name!r} raised {what}") from e
        except KeyboardInterrupt as e:
            if type(e) is not KeyboardInterrupt:  # the trainer's own quit-now signal (ForcedQuit): not the function's
                raise
            raise RewardError(f"reward function {name!r} raised KeyboardInterrupt") from e
        vals = check_rewards(name, out, len(completions))
        per_fn[name] = vals
        total = [t + w * v for t, v in zip(total, vals)]
    bad = next((i for i, t in enumerate(total) if not math.isfinite(t) or abs(t) > _F32_MAX), None)
    if bad is not None:
        raise RewardError(f"the weighted sum of the rewards is {total[bad]!r} at index {bad}; lower the reward "
                          "values or their weights (rewards.*)")
    return total, per_fn
