"""Schedules, cutting from the end of the trace, and prompt assembly."""

import math

import pytest

from rtpo.config import CurriculumConfig
from rtpo.curriculum import Curriculum, adaptive_update, anneal_length, keep_ratio
from rtpo.prompts import PromptBuilder, cut_length, line_boundaries
from rtpo.data import Example
from rtpo.embedded import build_tokenizer


def cc(**kw):
    c = CurriculumConfig()
    for k, v in kw.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize("schedule,step,want", [
    ("linear", 0, 1.0), ("linear", 25, 0.75), ("linear", 50, 0.5), ("linear", 100, 0.0), ("linear", 150, 0.0),
    ("cosine", 0, 1.0), ("cosine", 50, 0.5), ("cosine", 25, 1 - 0.5 * (1 - math.cos(math.pi * 0.25))),
    ("cosine", 100, 0.0),
    ("exponential", 0, 1.0), ("exponential", 20, math.exp(-5 * 0.2)), ("exponential", 100, 0.0),
    ("piecewise", 0, 0.8), ("piecewise", 29, 0.8), ("piecewise", 30, 0.5), ("piecewise", 60, 0.2),
    ("piecewise", 90, 0.0), ("none", 0, 0.0), ("none", 77, 0.0),
])
def test_schedule_values(schedule, step, want):
    """keep(step) = 1 - f(min(step / T, 1)) for each schedule (T = 100 given)."""
    assert keep_ratio(step, cc(schedule=schedule, anneal_steps=100), max_steps=1000) == pytest.approx(want, abs=1e-12)


def test_constant_warmup_and_floor():
    """constant keeps `value`; warmup holds keep = 1 before progress starts; floor bounds it below."""
    assert keep_ratio(50, cc(schedule="constant", value=0.3), 100) == 0.3
    c = cc(schedule="linear", anneal_steps=10, warmup_steps=5)
    assert [keep_ratio(s, c, 100) for s in (0, 4, 5, 10, 15, 99)] == pytest.approx([1, 1, 1, 0.5, 0, 0])
    assert keep_ratio(99, cc(schedule="linear", anneal_steps=10, floor=0.25), 100) == 0.25


def test_anneal_length_comes_from_the_real_run_length():
    """T defaults to anneal_fraction of the real steps (never 1 step, the original code's bug)."""
    assert anneal_length(cc(), max_steps=120) == 90
    assert anneal_length(cc(warmup_steps=20), max_steps=120) == 75
    assert keep_ratio(1, cc(schedule="linear"), max_steps=120) > 0.98


def test_schedules_are_pure_functions_of_step():
    """The same step gives the same keep, in any order of calls."""
    c = cc(schedule="cosine")
    a = [keep_ratio(s, c, 200) for s in range(200)]
    b = [keep_ratio(s, c, 200) for s in reversed(range(200))][::-1]
    assert a == b and all(x >= y for x, y in zip(a, a[1:]))


def test_adaptive_drops_only_while_accurate():
    """Adaptive keep falls by `adaptive_step` while accuracy >= target and holds when it drops."""
    c = cc(schedule="adaptive", adaptive_target=0.6, adaptive_step=0.1)
    assert adaptive_update(1.0, 0.7, c) == pytest.approx(0.9)
    assert adaptive_update(0.9, 0.5, c) == pytest.approx(0.9)
    assert adaptive_update(0.05, 0.9, c) == 0.0
    cur = Curriculum(c, 100)
    for acc in (0.9, 0.9, 0.1, 0.9):
        cur.observe(0, acc)
    assert cur.keep(1) == pytest.approx(0.7)
    state = cur.state_dict()
    cur2 = Curriculum(c, 100)
    cur2.load_state_dict(state)
    assert cur2.keep(5) == cur.keep(5)


@pytest.mark.parametrize("n", [0, 1, 7, 100])
@pytest.mark.parametrize("keep", [0.0, 0.01, 0.3, 0.5, 0.999, 1.0])
def test_token_cut(n, keep):
    """floor(keep * n) tokens; keep = 1 keeps all, keep = 0 keeps none."""
    k = cut_length(n, keep)
    assert k == math.floor(keep * n + 1e-9) and 0 <= k <= n
    assert cut_length(n, 1.0) == n and cut_length(n, 0.0) == 0


def test_cut_is_exact_at_representable_fractions():
    """0.3 * 10 computed as 2.9999999999999996 still keeps 3 tokens."""
    assert cut_length(10, 0.3) == 3 and cut_length(10, 0.7) == 7


TRACE = "12+7=19\n19-5=14\n14+20=34"


def test_line_boundaries_and_line_cut():
    """Line cuts round down to the end of a whole line; the kept part never ends mid-line."""
    tok = build_tokenizer()
    enc = tok(TRACE, add_special_tokens=False, return_offsets_mapping=True)
    b = line_boundaries(TRACE, enc["offset_mapping"])
    assert b == [0, 8, 16, len(TRACE)]
    for keep in [i / 50 for i in range(51)]:
        k = cut_length(len(enc["input_ids"]), keep, b)
        text = tok.decode(enc["input_ids"][:k])
        assert TRACE.startswith(text)
        assert k in b and (text == "" or text.endswith("\n") or text == TRACE)


def _builder(**kw):
    tok = build_tokenizer()
    return tok, PromptBuilder(tok, cc(**kw), max_prompt_tokens=512)


EX = Example("Compute 12+7-5+20.", TRACE, "34", 0)


@pytest.mark.parametrize("granularity", ["token", "line"])
@pytest.mark.parametrize("keep", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_prefix_prompt_is_eval_prompt_plus_exact_trace_prefix(granularity, keep):
    """prefix mode: prompt = evaluation prompt + '<think>\\n' + the first k trace tokens, exactly."""
    tok, b = _builder(granularity=granularity)
    enc = b.encode(EX)
    ids, k = b.build(enc, keep)
    eval_ids = b.build(enc, 0.0)[0]
    assert ids[:len(eval_ids)] == eval_ids
    if k == 0:
        assert ids == eval_ids
        text = tok.decode(ids)
        assert "<think>" not in text and text.endswith("<|im_start|>assistant\n")
    else:
        hint = tok.decode(ids[len(eval_ids):])
        assert hint.startswith("<think>\n") and TRACE.startswith(hint[len("<think>\n"):])
        assert len(enc.reasoning[:k]) == k
    if keep == 1.0:
        assert tok.decode(ids).endswith(TRACE)


def test_turn_mode_closed_message_and_no_empty_turn_at_zero():
    """turn mode: the kept trace is a closed earlier assistant message and a fresh assistant turn
    follows; at keep 0 no empty assistant message remains (prompt == evaluation prompt)."""
    tok, b = _builder(injection="turn")
    enc = b.encode(EX)
    text = tok.decode(b.build(enc, 1.0)[0])
    assert text.endswith(f"<|im_start|>assistant\n{TRACE}<|im_end|>\n<|im_start|>assistant\n")
    half = tok.decode(b.build(enc, 0.5)[0])
    assert half.count("<|im_start|>assistant\n") == 2
    zero_ids, k = b.build(enc, 0.0)
    assert k == 0 and zero_ids == b.encode(EX).base
    assert tok.decode(zero_ids).count("assistant") == 1


def test_empty_reasoning_means_no_hint():
    """A row with empty reasoning is allowed and is never given a hint."""
    _, b = _builder()
    enc = b.encode(Example("Compute 1+2.", "", "3", 0))
    assert b.build(enc, 1.0) == (enc.base, 0)


def test_overlong_trace_is_cut_to_budget_and_flagged():
    """A trace longer than the prompt budget is cut (never overflowing), and marked truncated."""
    tok = build_tokenizer()
    b = PromptBuilder(tok, cc(), max_prompt_tokens=50)
    enc = b.encode(Example("Compute 1+2.", "1+2=3\n" * 40, "3", 0))
    assert enc.truncated
    assert len(b.build(enc, 1.0)[0]) <= 50


def test_plain_template_without_chat_template():
    """A tokenizer without a chat template gets the plain Question/Answer template."""
    tok = build_tokenizer()
    tok.chat_template = None
    b = PromptBuilder(tok, cc(), max_prompt_tokens=512)
    text = tok.decode(b.build(b.encode(EX), 0.0)[0])
    assert text == "Question: Compute 12+7-5+20.\nAnswer: "


def test_adaptive_never_lags_the_linear_anneal():
    """Adaptive keep runs ahead of the linear anneal while accuracy >= target, holds while it is
    below, but never stays above the linear keep: with accuracy always low it still reaches 0 at the
    end of the anneal (the last steps train on evaluation prompts), as RTPO.md's schedules do."""
    c = cc(schedule="adaptive", adaptive_target=0.7, adaptive_step=0.3, warmup_steps=2)
    lin = cc(schedule="linear", warmup_steps=2)  # T = round(0.75 * 8) = 6: keep 1 until step 2, 0 from step 8
    low = Curriculum(c, 10)
    keeps = []
    for s in range(10):
        keeps.append(low.keep(s))
        low.observe(s, 0.0)
    assert keeps == pytest.approx([keep_ratio(s, lin, 10) for s in range(10)])
    assert keeps[:3] == [1.0, 1.0, 1.0] and keeps[-2:] == [0.0, 0.0]
    high = Curriculum(c, 10)
    for s in range(4):
        high.observe(s, 1.0)  # warmup steps 0, 1 leave it at 1; steps 2, 3 lower it by 0.3 each
    assert high.keep(4) == pytest.approx(0.4) and keep_ratio(4, lin, 10) == pytest.approx(2 / 3)


# --- hints that adapt to each example ----------------------------------------------------------
def test_per_example_update_grows_after_all_wrong_and_shrinks_after_success():
    """An example's own keep: +step after an all-wrong group, -step at accuracy >= target, else held;
    always in [0, 1]."""
    from rtpo.curriculum import per_example_update

    c = cc(per_example_step=0.25, per_example_target=0.5)
    assert per_example_update(0.5, 0.0, c) == 0.75
    assert per_example_update(0.5, 0.5, c) == 0.25
    assert per_example_update(0.5, 0.25, c) == 0.5
    assert per_example_update(0.9, 0.0, c) == 1.0 and per_example_update(0.1, 1.0, c) == 0.0


def test_per_example_keep_is_capped_by_the_schedule_and_checkpointed():
    """With per_example, keep_i = min(schedule keep, own keep): examples that succeed lose their hint
    ahead of the schedule, and when the schedule reaches 0 no example has a hint. The own keeps are
    part of the state dict (exact resume)."""
    c = cc(schedule="linear", anneal_steps=10, per_example=True, per_example_step=0.5, per_example_target=0.5)
    cur = Curriculum(c, 20)
    assert cur.example_keeps(0, [3, 7]) == [1.0, 1.0]
    cur.observe_examples([3, 7], [1.0, 1.0], [1.0, 0.0])  # 3 solved its group, 7 failed all
    assert cur.example_keeps(2, [3, 7]) == pytest.approx([0.5, 0.8])
    cur.observe_examples([3], [0.5], [0.0])  # 3 failed at keep 0.5: back to 1, capped by the schedule
    assert cur.example_keeps(5, [3]) == pytest.approx([0.5])
    assert cur.example_keeps(10, [3, 7, 11]) == [0.0, 0.0, 0.0]
    again = Curriculum(c, 20)
    again.load_state_dict(cur.state_dict())
    assert again.example_keeps(4, [3, 7, 11]) == cur.example_keeps(4, [3, 7, 11])
    plain = Curriculum(cc(schedule="linear", anneal_steps=10), 20)
    plain.observe_examples([3], [1.0], [1.0])
    assert plain.example_keeps(2, [3]) == [plain.keep(2)]  # off: the schedule alone


def test_dropout_rows_rounds_to_the_nearest_row():
    from rtpo.curriculum import dropout_rows

    assert [dropout_rows(8, d) for d in (0.0, 0.1, 0.125, 0.25, 0.5, 1.0)] == [0, 1, 1, 2, 4, 8]


def test_hint_target_is_exactly_the_injected_text():
    """The hint loss target is what the hinted prompt adds to the evaluation prompt (prefix mode:
    the think opener + the kept trace; turn mode: the kept trace), and nothing at keep 0."""
    tok = build_tokenizer()
    ex = Example("Compute 1+2+3.", "1+2+3\n3+3\n6", "6", 0)
    for injection in ("prefix", "turn"):
        b = PromptBuilder(tok, cc(injection=injection), 512)
        enc = b.encode(ex)
        ctx, tgt = b.hint_target(enc, 0.5)
        prompt, k = b.build(enc, 0.5)
        assert k > 0 and tgt[-k:] == enc.reasoning[:k]
        if injection == "prefix":
            assert ctx + tgt == prompt
        else:
            assert prompt[:len(ctx) + len(tgt)] == ctx + tgt
        assert b.hint_target(enc, 0.0) == (enc.base, [])


def test_hints_on_demand_start_without_a_hint_and_grow_only_after_failures():
    """per_example_start 0 (hints on demand, BREAD / NuRL): an example has no hint until its group is all
    wrong; each all-wrong group adds per_example_step, a solved one removes it; the state round-trips."""
    c = cc(schedule="constant", value=1.0, per_example=True, per_example_start=0.0, per_example_step=0.25,
           per_example_target=0.5)
    cur = Curriculum(c, 100)
    assert cur.example_keeps(0, [3, 7]) == [0.0, 0.0]
    cur.observe_examples([3, 7], [0.0, 0.0], [0.0, 0.75])  # 3 all wrong, 7 solved
    assert cur.example_keeps(1, [3, 7]) == [0.25, 0.0]
    cur.observe_examples([3], [0.25], [0.0])
    assert cur.example_keeps(2, [3]) == [0.5]
    cur.observe_examples([3], [0.5], [1.0])
    assert cur.example_keeps(3, [3, 9]) == [0.25, 0.0]
    again = Curriculum(c, 100)
    again.load_state_dict(cur.state_dict())
    assert again.example_keeps(3, [3, 9]) == [0.25, 0.0]


def test_sft_weight_is_constant_or_decays_to_zero_with_the_anneal():
    from rtpo.curriculum import sft_weight

    c = cc(schedule="none", warmup_steps=2, anneal_steps=8)
    assert [sft_weight(s, 0.5, "none", c, 20) for s in (0, 5, 19)] == [0.5, 0.5, 0.5]
    assert [sft_weight(s, 0.5, "linear", c, 20) for s in (0, 2, 6, 10, 15)] == [0.5, 0.5, 0.25, 0.0, 0.0]
