"""Prompt assembly: a question with the first floor(keep * n) tokens of its reasoning trace spliced
in at the token level (`PromptBuilder`), the cut itself (`cut_length`, on line boundaries with
`granularity: line`), and the supervised response of an example (`response_ids`). How much to keep
at a step is the curriculum's business (rtpo/curriculum.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rtpo.vision import PLACEHOLDER

if TYPE_CHECKING:
    from rtpo.config import CurriculumConfig


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
    images: tuple = ()  # the row's images (PIL), whose expanded image tokens are in base / turn_pre


@dataclass
class Prompt:
    """One example's prompt at one keep: built once per (example, keep), shared by the group's rows."""
    ids: list           # the prompt's token ids
    injected: int       # trace tokens spliced in (0: the evaluation prompt)
    prefix: str         # prefix mode: the response text already in the prompt, which the completion continues
    hint_context: list  # the hint loss's context: what precedes the injected text
    hint_target: list   # the injected text the model would have to write itself ([] at keep 0)


class PromptBuilder:
    """Builds token-level prompts. The kept trace is spliced in as token ids, so the model sees
    exactly the first k tokens of the tokenized trace; at keep 0 the prompt is the evaluation
    prompt (no empty assistant message, no dangling think tag)."""

    def __init__(self, tokenizer, c: CurriculumConfig, max_prompt_tokens: int, system_prompt=None, vision=None):
        self.tok, self.c = tokenizer, c
        self.max_prompt_tokens = max_prompt_tokens
        self.system_prompt = system_prompt
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.vision = vision  # rtpo.vision.VisionProcessor of a vision-language model, else None

    def ids(self, text: str) -> list:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def render(self, question: str, assistant=None, images: int = 0) -> str:
        """Chat-formatted text up to an open assistant turn; with `assistant`, that text is a
        closed earlier assistant message before the open turn. `images`: image placeholders before the
        question in the user turn (Qwen2-VL content parts)."""
        if not self.has_template:  # a plain template for base models
            question = PLACEHOLDER * images + question
            text = (self.system_prompt + "\n\n" if self.system_prompt else "") + f"Question: {question}\nAnswer: "
            if assistant is not None:
                text += f"{assistant}\n\nQuestion: {question}\nAnswer: "
            return text
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        if images:
            msgs.append({"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]})
        else:
            msgs.append({"role": "user", "content": question})
        if assistant is not None:
            msgs.append({"role": "assistant", "content": assistant})
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def encode(self, ex) -> EncodedExample:
        images = tuple(getattr(ex, "images", ()))
        if images and self.vision is None:
            raise ValueError(f"row {ex.index} has images but the model is text-only")
        counts = self.vision.token_counts(images) if images else []

        def ids(text):  # each image's one placeholder token -> as many image tokens as the image takes
            out = self.ids(text)
            return self.vision.expand(out, counts) if self.vision is not None else out

        base = ids(self.render(ex.question, images=len(images)))
        if base and self.tok.bos_token_id is not None and getattr(self.tok, "add_bos_token", False) \
                and base[0] != self.tok.bos_token_id:
            base = [self.tok.bos_token_id] + base
        hint_open = self.ids(self.c.think_open + "\n")
        pre, _, post = self.render(ex.question, assistant=_SLOT, images=len(images)).partition(_SLOT)
        turn_pre, turn_post = ids(pre), self.ids(post)
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
        return EncodedExample(base, hint_open, turn_pre, turn_post, reasoning, boundaries, truncated, images)

    def image_inputs(self, enc: EncodedExample):
        """The example's images as model inputs (rtpo.vision.ImageInputs), or None without images. Computed
        on demand (a dataset's pixel tensors are not kept); a step computes each group's once."""
        return self.vision.process(enc.images) if enc.images else None

    def kept(self, enc: EncodedExample, keep: float) -> int:
        bounds = enc.boundaries if self.c.granularity == "line" else None
        return cut_length(len(enc.reasoning), keep, bounds)

    def prompt(self, enc: EncodedExample, keep: float) -> Prompt:
        """The example's prompt at this keep ratio, with everything the step reads from it, built once."""
        k = self.kept(enc, keep)
        if k == 0:
            return Prompt(list(enc.base), 0, "", list(enc.base), [])
        hint = enc.reasoning[:k]
        if self.c.injection == "prefix":
            # the response already in the prompt: the completion continues it, rewards read the two together
            return Prompt(enc.base + enc.hint_open + hint, k, self.tok.decode(enc.hint_open + hint), list(enc.base),
                          enc.hint_open + hint)
        return Prompt(enc.turn_pre + hint + enc.turn_post, k, "", list(enc.turn_pre), hint)

    def build(self, enc: EncodedExample, keep: float) -> tuple[list, int]:
        """(prompt ids, number of injected trace tokens) at this keep ratio."""
        p = self.prompt(enc, keep)
        return p.ids, p.injected

    def hint_target(self, enc: EncodedExample, keep: float) -> tuple[list, list]:
        """(context, target) of the supervised hint loss at this keep ratio (see `Prompt`)."""
        p = self.prompt(enc, keep)
        return p.hint_context, p.hint_target


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
