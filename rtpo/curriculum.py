"""The RTPO curriculum: how much of each reasoning trace is injected at a step, and the prompts.

keep(step) in [0, 1] is a pure function of the step (the adaptive schedule excepted, whose state is
checkpointed). Each example keeps floor(keep * n_i) of its own n_i trace tokens, cut from the END;
with `granularity: line` the cut is rounded down to a line boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from rtpo.config import CurriculumConfig


# --- schedules: f(r) = fraction of the trace removed at progress r in [0, 1] -------------------
def _linear(r, c):
    return r


def _cosine(r, c):
    return 0.5 * (1.0 - math.cos(math.pi * r))


def _exponential(r, c):
    # f(1) = 1 - exp(-k) < 1: the tail is removed at the end of the anneal (r = 1 -> keep 0).
    return 1.0 if r >= 1 else 1.0 - math.exp(-c.decay_rate * r)


def _piecewise(r, c):
    f = c.values[0]
    for m, v in zip(c.milestones, c.values[1:]):
        if r >= m:
            f = v
    return f


def _constant(r, c):
    return 1.0 - c.value


def _none(r, c):
    return 1.0  # plain GRPO: no hint at any step


SCHEDULES = {
    "linear": _linear,
    "cosine": _cosine,
    "exponential": _exponential,
    "piecewise": _piecewise,
    "constant": _constant,
    "none": _none,
    "adaptive": None,  # driven by accuracy: see adaptive_update
}


def anneal_length(c: CurriculumConfig, max_steps: int) -> int:
    """T: given, or `anneal_fraction` of the steps after warmup (so the run ends with some no-hint
    steps). Never less than 1, and computed from the real run length (the original code's default
    of 1 step made the hint vanish after the first step)."""
    if c.anneal_steps > 0:
        return c.anneal_steps
    return max(1, round(c.anneal_fraction * max(max_steps - c.warmup_steps, 1)))


def keep_ratio(step: int, c: CurriculumConfig, max_steps: int) -> float:
    """keep(step) = max(floor, 1 - f(r)), r = min(max(step - warmup, 0) / T, 1); keep = 1 during warmup."""
    if c.schedule == "adaptive":
        raise ValueError("the adaptive schedule is stateful: use Curriculum")
    if c.schedule == "constant":
        return c.value
    r = min(max(step - c.warmup_steps, 0) / anneal_length(c, max_steps), 1.0)
    keep = 1.0 - SCHEDULES[c.schedule](r, c)
    return min(1.0, max(c.floor, keep))


def adaptive_update(keep: float, accuracy: float, c: CurriculumConfig) -> float:
    """keep' = keep - step while the batch accuracy >= target, else keep (hold while it drops)."""
    if accuracy >= c.adaptive_target:
        keep = keep - c.adaptive_step
    return max(c.floor, min(1.0, keep))


def per_example_update(keep: float, group_accuracy: float, c: CurriculumConfig) -> float:
    """One example's own keep after a group of its rollouts (AdaBack-style):
    all wrong -> keep + per_example_step; accuracy >= per_example_target -> keep - per_example_step;
    otherwise unchanged. Clipped to [0, 1]."""
    if group_accuracy <= 0.0:
        keep = keep + c.per_example_step
    elif group_accuracy >= c.per_example_target:
        keep = keep - c.per_example_step
    return max(0.0, min(1.0, keep))


def dropout_rows(G: int, hint_dropout: float) -> int:
    """How many of a group's G rows get no hint: round(hint_dropout * G), at most G."""
    return min(G, int(math.floor(hint_dropout * G + 0.5)))


class Curriculum:
    """keep(step) for every schedule; carries the one number of adaptive state for checkpoints.

    The adaptive keep never lags the linear anneal (same warmup, T and floor): it runs ahead of it
    while the batch accuracy stays >= target and holds while accuracy is low, but the linear keep is
    its ceiling, so it still reaches the floor by the end of the anneal and the last steps train on
    the evaluation prompts, as with every other schedule. Without that deadline a task whose
    accuracy falls below the target as soon as the answer is cut (GSM8K-style traces end with it)
    would hold keep near 1 for the whole run."""

    def __init__(self, c: CurriculumConfig, max_steps: int):
        self.c, self.max_steps = c, max_steps
        self.adaptive_keep = 1.0
        self.example_keep: dict[int, float] = {}  # per_example: each example's own keep (1 until observed)

    def _deadline(self, step: int) -> float:
        return keep_ratio(step, replace(self.c, schedule="linear"), self.max_steps)

    def keep(self, step: int) -> float:
        if self.c.schedule == "adaptive":
            return min(self.adaptive_keep, self._deadline(step))  # the deadline is 1 during warmup
        return keep_ratio(step, self.c, self.max_steps)

    def example_keeps(self, step: int, indices: list) -> list:
        """keep for each example: the schedule's keep, or with per_example the smaller of it and
        the example's own keep (the schedule is the ceiling: at schedule keep 0 no example has a hint)."""
        keep = self.keep(step)
        if not self.c.per_example:
            return [keep] * len(indices)
        return [min(keep, self.example_keep.get(i, 1.0)) for i in indices]

    def observe(self, step: int, accuracy: float) -> None:
        if self.c.schedule == "adaptive" and step >= self.c.warmup_steps:
            self.adaptive_keep = adaptive_update(self.keep(step), accuracy, self.c)

    def observe_examples(self, indices: list, keeps: list, group_accuracies: list) -> None:
        """per_example: move each example's own keep from the keep its group was given."""
        if self.c.per_example:
            for i, k, a in zip(indices, keeps, group_accuracies):
                self.example_keep[int(i)] = per_example_update(k, a, self.c)

    def state_dict(self) -> dict:
        return {"adaptive_keep": self.adaptive_keep, "example_keep": dict(self.example_keep)}

    def load_state_dict(self, d: dict) -> None:
        self.adaptive_keep = float(d["adaptive_keep"])
        self.example_keep = {int(k): float(v) for k, v in d.get("example_keep", {}).items()}


# --- cutting -------------------------------------------------------------------------------------
def cut_length(n: int, keep: float, boundaries=None) -> int:
    """Number of trace tokens kept: floor(keep * n), rounded down to the largest boundary when line
    boundaries are given (the kept part then never ends mid-line)."""
    k = math.floor(keep * n + 1e-9)  # 1e-9: keep * n computed as 2.9999999 must still keep 3
    k = min(max(k, 0), n)
    if boundaries is not None:
        k = max(b for b in boundaries if b <= k)
    return k


def line_boundaries(text: str, offsets) -> list[int]:
    """Token counts k at which the first k tokens end a line (their text ends in a newline), plus
    0 and n. `offsets` are the (start, end) character spans of the tokens in `text`."""
    n = len(offsets)
    out = [0]
    for k in range(1, n):
        end = offsets[k - 1][1]
        if end > 0 and text[end - 1] == "\n":
            out.append(k)
    if n:
        out.append(n)
    return out


# --- prompt assembly -----------------------------------------------------------------------------
_SLOT = "\u2063RTPO_HINT\u2063"  # a placeholder no dataset contains


@dataclass
class EncodedExample:
    """Everything needed to build this example's prompt at any keep, tokenized once."""
    base: list          # chat prompt up to the open assistant turn (the evaluation prompt)
    hint_open: list     # "<think>\n" that opens the assistant turn before the hint (prefix mode)
    turn_pre: list      # turn mode: prompt up to the earlier assistant message's content
    turn_post: list     # turn mode: end of that message + a fresh assistant turn
    reasoning: list     # the trace's token ids
    boundaries: list    # line boundaries of the trace (token counts)
    truncated: bool     # the trace was cut to fit data.max_prompt_tokens


class PromptBuilder:
    """Builds token-level prompts. The kept trace is spliced in as token ids, so the model sees
    exactly the first k tokens of the tokenized trace; at keep 0 the prompt is the evaluation
    prompt (no empty assistant message, no dangling think tag)."""

    def __init__(self, tokenizer, c: CurriculumConfig, max_prompt_tokens: int, system_prompt=None):
        self.tok, self.c = tokenizer, c
        self.max_prompt_tokens = max_prompt_tokens
        self.system_prompt = system_prompt
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def ids(self, text: str) -> list:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def render(self, question: str, assistant=None) -> str:
        """Chat-formatted text up to an open assistant turn; with `assistant`, that text is a
        closed earlier assistant message before the open turn."""
        if not self.has_template:  # a plain template for base models
            text = (self.system_prompt + "\n\n" if self.system_prompt else "") + f"Question: {question}\nAnswer: "
            if assistant is not None:
                text += f"{assistant}\n\nQuestion: {question}\nAnswer: "
            return text
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        msgs.append({"role": "user", "content": question})
        if assistant is not None:
            msgs.append({"role": "assistant", "content": assistant})
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def encode(self, ex) -> EncodedExample:
        base = self.ids(self.render(ex.question))
        if base and self.tok.bos_token_id is not None and getattr(self.tok, "add_bos_token", False) \
                and base[0] != self.tok.bos_token_id:
            base = [self.tok.bos_token_id] + base
        hint_open = self.ids(self.c.think_open + "\n")
        pre, _, post = self.render(ex.question, assistant=_SLOT).partition(_SLOT)
        turn_pre, turn_post = self.ids(pre), self.ids(post)
        enc = self.tok(ex.reasoning, add_special_tokens=False, return_offsets_mapping=True) if ex.reasoning else None
        reasoning = list(enc["input_ids"]) if enc else []
        boundaries = line_boundaries(ex.reasoning, enc["offset_mapping"]) if enc else [0]
        overhead = max(len(base) + len(hint_open), len(turn_pre) + len(turn_post))
        if overhead > self.max_prompt_tokens:
            raise PromptTooLong(ex.index, overhead, self.max_prompt_tokens)
        room = self.max_prompt_tokens - overhead
        truncated = len(reasoning) > room
        if truncated:  # keep the start of the trace: the curriculum cuts from the end anyway
            reasoning = reasoning[:room]
            boundaries = [b for b in boundaries if b <= room] + ([room] if room not in boundaries else [])
        return EncodedExample(base, hint_open, turn_pre, turn_post, reasoning, boundaries, truncated)

    def kept(self, enc: EncodedExample, keep: float) -> int:
        bounds = enc.boundaries if self.c.granularity == "line" else None
        return cut_length(len(enc.reasoning), keep, bounds)

    def build(self, enc: EncodedExample, keep: float) -> tuple[list, int]:
        """(prompt ids, number of injected trace tokens) at this keep ratio."""
        k = self.kept(enc, keep)
        if k == 0:
            return list(enc.base), 0
        hint = enc.reasoning[:k]
        if self.c.injection == "prefix":
            return enc.base + enc.hint_open + hint, k
        return enc.turn_pre + hint + enc.turn_post, k

    def hint_target(self, enc: EncodedExample, keep: float) -> tuple[list, list]:
        """(context, target) for the supervised hint loss: the target is the injected text the model
        would have to write itself (the think opener + kept trace in prefix mode, the kept trace in
        turn mode) and the context is what precedes it. Empty target at keep 0."""
        k = self.kept(enc, keep)
        if k == 0:
            return list(enc.base), []
        if self.c.injection == "prefix":
            return list(enc.base), enc.hint_open + enc.reasoning[:k]
        return list(enc.turn_pre), enc.reasoning[:k]

    def prefix_text(self, enc: EncodedExample, keep: float) -> str:
        """The part of the assistant's response already in the prompt (prefix mode): the model's
        completion continues it; format and reasoning-length metrics read the two together."""
        k = self.kept(enc, keep)
        if k == 0 or self.c.injection != "prefix":
            return ""
        return self.tok.decode(enc.hint_open + enc.reasoning[:k])


class PromptTooLong(ValueError):
    def __init__(self, index, need, budget):
        super().__init__(f"row {index}: the question alone takes {need} tokens, more than data.max_prompt_tokens = "
                         f"{budget}; raise --data.max_prompt_tokens")
        self.index, self.need = index, need


def response_ids(builder: PromptBuilder, ex, enc: EncodedExample, eos_id: int, with_reasoning: bool = True) -> list:
    """The full target response, tokenized the same way as prompts are built (for the supervised
    warm-start): <think>\\n + trace + \\n</think>\\n + answer + EOS; without the trace
    (`with_reasoning` False or an empty trace): <think>\\n</think>\\n + answer + EOS."""
    tail = builder.ids("\n" + builder.c.think_close + "\n" + ex.answer)
    if not enc.reasoning or not with_reasoning:
        return builder.ids(builder.c.think_open + "\n" + builder.c.think_close + "\n" + ex.answer) + [eos_id]
    return enc.hint_open + enc.reasoning + tail + [eos_id]
