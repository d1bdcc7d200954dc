"""Answer extraction, numeric-aware accuracy, format and length rewards, user functions."""

import pytest

from rtpo.config import RewardConfig
from rtpo.rewards import (accuracy_reward, answers_match, build_reward_functions, extract_answer, format_reward,
                          import_function, length_penalty, score)


@pytest.mark.parametrize("text,want", [
    ("so 3+4=7 and the answer is 12", "12"), ("#### 1,000", "1,000"), ("\\boxed{42} then 7", "42"),
    ("no numbers", None), ("x = -3.5", "-3.5"), ("Answer: 9 (nine)", "9"),
])
def test_extract_answer(text, want):
    """\\boxed{}, '####', 'answer is' and 'Answer:' win over other numbers; else the last number."""
    assert extract_answer(text) == want


@pytest.mark.parametrize("pred,gold,ok", [
    ("72", "72", True), ("72.0", "72", True), ("1,000", "1000", True), ("$5", "5", True), ("71", "72", False),
    (None, "1", False), ("Paris", " paris ", True), ("1e400", "1", False),
])
def test_answers_match_numeric_aware(pred, gold, ok):
    """Numbers compare by value; text compares normalised."""
    assert answers_match(pred, gold) is ok


def test_accuracy_reads_the_answer_after_the_reasoning():
    """Numbers inside the reasoning do not count: only the text after </think> does."""
    r = ["<think>\n1+2=3\n</think>\n3", "<think>\n1+2=3\n</think>\n4", "<think>\n1+2=3"]
    assert accuracy_reward(r, ["3", "3", "3"]) == [1.0, 0.0, 1.0]


def test_format_reward():
    """One closed think block, a non-empty answer and a natural end score 1; anything else 0."""
    rs = ["<think>\na\n</think>\n3", "<think>\na\n</think>\n", "a</think>3", "<think>\na\n</think>\n3",
          "<think>a</think>1</think>2"]
    fr = ["eos", "eos", "eos", "length", "eos"]
    assert format_reward(rs, [""] * 5, finish_reasons=fr) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_length_penalty_and_weighted_sum():
    """Total reward = sum of weight * function value, per completion."""
    fns = build_reward_functions(RewardConfig(accuracy=1.0, format=0.5, length_penalty=0.2))
    comps = ["<think>\nx\n</think>\n3", "<think>\nx\n</think>\n4"]
    total, per = score(fns, comps, ["3", "3"], responses=comps, finish_reasons=["eos", "eos"],
                       completion_lengths=[10, 20], max_new_tokens=40)
    assert per["length_penalty"] == [-0.25, -0.5]
    assert total == pytest.approx([1 + 0.5 - 0.05, 0 + 0.5 - 0.1])
    assert length_penalty([""], [""], completion_lengths=[8], max_new_tokens=16) == [-0.5]


def test_user_reward_function_by_module_path(tmp_path, monkeypatch):
    """A 'module:function' in rewards.custom is imported and weighted; bad paths name what failed."""
    (tmp_path / "myrewards.py").write_text("def short(completions, answers, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fns = build_reward_functions(RewardConfig(accuracy=0, format=0, custom={"myrewards:short": 2.0}))
    total, _ = score(fns, ["a", "abc"], ["", ""])
    assert total == pytest.approx([1.0, 0.5])
    with pytest.raises(ValueError, match="cannot import module 'nope_mod'"):
        import_function("nope_mod:f")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        import_function("myrewards:missing")
    with pytest.raises(ValueError, match="must be written 'module:function'"):
        import_function("myrewards.short")


def test_wrong_length_reward_is_an_error(tmp_path, monkeypatch):
    """A reward function returning the wrong number of values is named in the error."""
    (tmp_path / "badr.py").write_text("def f(completions, answers, **kw):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fns = build_reward_functions(RewardConfig(accuracy=0, format=0, custom={"badr:f": 1.0}))
    with pytest.raises(ValueError, match="'badr:f' returned 1 values for 2"):
        score(fns, ["a", "b"], ["", ""])
