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


# --- the reward API: one signature, dataset columns by name ----------------------------------------

def test_call_reward_adapts_to_every_documented_form():
    """call_reward passes the documented keyword arguments to the new form (keyword-only `answers`,
    named columns, **columns), to the older `fn(completions, answers, **ctx)` form, to a function
    whose second positional parameter has another name, and to one without **kwargs (it gets only
    the names it declares)."""
    from rtpo.rewards import call_reward

    kw = {"prompts": ["p1", "p2"], "completion_ids": [[1], [2, 3]], "difficulty": [1, 2], "step": 7}

    def new(completions, *, prompts, answers, completion_ids, difficulty, **columns):
        assert prompts == ["p1", "p2"] and answers == ["a", "b"] and columns == {"step": 7}
        return [d + len(ids) for d, ids in zip(difficulty, completion_ids)]

    def old(completions, answers, **ctx):
        assert set(ctx) == set(kw)
        return [float(c == a) for c, a in zip(completions, answers)]

    def renamed(comps, golds):  # positional, another name, no **kwargs: nothing else is passed
        return [len(g) for g in golds]

    def columns_only(completions, *, difficulty):  # no answers, no **kwargs
        return difficulty

    assert call_reward(new, ["x", "y"], ["a", "b"], kw) == [2, 4]
    assert call_reward(old, ["a", "z"], ["a", "b"], kw) == [1.0, 0.0]
    assert call_reward(renamed, ["x", "y"], ["a", "bb"], kw) == [1, 2]
    assert call_reward(columns_only, ["x", "y"], ["a", "b"], kw) == [1, 2]


def test_missing_arguments_names_what_nothing_provides():
    """A required parameter that is neither the answers slot nor an available name is reported;
    defaults, **kwargs and the answers slot are never missing."""
    from rtpo.rewards import missing_arguments

    def f(completions, answers, *, difficulty, topic="x", **kw):
        return []

    def g(comps, golds, level):
        return []

    assert missing_arguments(f, {"prompts"}) == ["difficulty"]
    assert missing_arguments(f, {"difficulty"}) == []
    assert missing_arguments(g, {"prompts"}) == ["level"]


@pytest.mark.parametrize("text,gold,want", [
    ("<think>x</think> so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0), ("\\boxed{12} then \\boxed{13}", "13", 1.0),
    ("<think>\\boxed{5}</think> 5", "5", 0.0), ("the answer is 5", "5", 0.0), ("\\boxed{1,000}", "1000", 1.0),
])
def test_boxed_reward_is_strict(text, gold, want):
    """boxed: only the last \\boxed{} after the reasoning counts (nested braces kept), numeric-aware."""
    from rtpo.rewards import boxed_reward

    assert boxed_reward([text], [gold]) == [want]


@pytest.mark.parametrize("text,gold,want", [
    ("<think>3+4=7</think>\n#### 7", "7", 1.0), ("#### 1,024 clips", "1024", 1.0), ("the answer is 7", "7", 0.0),
    ("#### 6\n#### 7", "7", 1.0), ("<think>#### 7</think> 7", "7", 0.0),
])
def test_gsm8k_reward_reads_the_last_hash_marker(text, gold, want):
    """gsm8k: the first number after the last '####' after the reasoning; no marker scores 0."""
    from rtpo.rewards import gsm8k_reward

    assert gsm8k_reward([text], [gold]) == [want]


@pytest.mark.parametrize("text,gold,want", [
    ('<think>..</think>```json\n{"answer": "B"}\n```', "b", 1.0), ('```json {"answer": 42} ```', "42", 1.0),
    ('```json {"answer": "C"} ```', "B", 0.5), ('```json {"answer": "B",} ```', "B", 0.0),
    ('{"answer": "B"}', "B", 0.0), ('```json {"result": "B"} ```', "B", 0.0),
    ('```json {"answer": "A"} ``` then ```json {"answer": "B"} ```', "B", 1.0),
])
def test_json_answer_reward_follows_the_original_scale(text, gold, want):
    """json_answer: the ```json {"answer": ...}``` block of the original work; correct 1, a
    well-formed block with a wrong answer 0.5, no/unparseable block or no "answer" key 0."""
    from rtpo.rewards import json_answer_reward

    assert json_answer_reward([text], [gold]) == [want]


def test_new_builtins_are_weighted_by_their_config_keys():
    """rewards.boxed / rewards.gsm8k / rewards.json_answer switch the built-ins on by weight."""
    fns = build_reward_functions(RewardConfig(accuracy=0, format=0, boxed=1.0, gsm8k=0.5, json_answer=2.0))
    total, per = score(fns, ["\\boxed{3} #### 3"], ["3"])
    assert set(per) == {"boxed", "gsm8k", "json_answer"} and total == [1.5]


def _dataset_with_columns(path):
    import json

    rows = [{"question": f"Compute {i}+1.", "reasoning": f"{i}+1={i + 1}", "answer": str(i + 1),
             "difficulty": i % 3, "source": f"src{i}"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return rows


def test_user_reward_receives_prompts_ids_and_every_dataset_column(tmp_path, monkeypatch):
    """Through the real trainer (rollout -> score), a user function written in the documented form
    receives the prompt text each completion was generated from, its token ids, and the dataset's
    extra columns (`difficulty`, `source`) of that completion's own row: it returns the row's
    difficulty, and the per-function rewards equal the difficulty column of each group's row."""
    from conftest import tiny_args
    from rtpo.cli import parse_args
    from rtpo.trainer import Trainer

    rows = _dataset_with_columns(tmp_path / "data.jsonl")
    (tmp_path / "colrewards.py").write_text(
        "SEEN = {}\n"
        "def by_difficulty(completions, *, prompts, answers, completion_ids, difficulty, **columns):\n"
        "    SEEN.update(prompts=prompts, ids=completion_ids, source=columns['source'], question=columns['question'],\n"
        "                completions=completions, keeps=columns['keeps'])\n"
        "    return [float(d) for d in difficulty]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = parse_args(tiny_args(tmp_path / "run", tmp_path / "cache", "--dataset", str(tmp_path / "data.jsonl"),
                               "--data.num_eval", "4", "--warmstart.enabled", "false", "--G", "2",
                               "--rewards.custom", '{"colrewards:by_difficulty": 1.0}'))
    t = Trainer(cfg, log=lambda m: None)
    ro = t.sampler.rollout(0)
    sc = t.scorer.score(ro)
    import colrewards

    by_q = {r["question"]: r for r in rows}
    groups = [t.run.train_rows[i] for i in ro.idx for _ in range(2)]
    assert sc.per_fn["colrewards:by_difficulty"] == [float(by_q[e.question]["difficulty"]) for e in groups]
    assert colrewards.SEEN["source"] == [by_q[e.question]["source"] for e in groups]
    assert colrewards.SEEN["question"] == [e.question for e in groups]
    assert colrewards.SEEN["ids"] == ro.completions
    assert colrewards.SEEN["prompts"] == [t.run.tok.decode(p, skip_special_tokens=False) for p in ro.prompts]
    assert all(e.question in p for e, p in zip(groups, colrewards.SEEN["prompts"]))
    assert colrewards.SEEN["keeps"] == ro.row_keep


def test_reward_needing_an_absent_column_is_refused_at_setup(tmp_path, monkeypatch):
    """A reward function that requires a column the dataset lacks stops at setup with a ConfigError
    naming the argument and listing the columns there are."""
    from conftest import tiny_args
    from rtpo.config import ConfigError
    from rtpo.cli import parse_args
    from rtpo.trainer import Trainer

    _dataset_with_columns(tmp_path / "data.jsonl")
    (tmp_path / "needy.py").write_text("def f(completions, *, answers, level, **kw):\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = parse_args(tiny_args(tmp_path / "run", tmp_path / "cache", "--dataset", str(tmp_path / "data.jsonl"),
                               "--data.num_eval", "4", "--warmstart.enabled", "false",
                               "--rewards.custom", '{"needy:f": 1.0}'))
    with pytest.raises(ConfigError, match=r"'needy:f' requires argument\(s\) 'level'.*columns: question, reasoning, "
                                          r"answer, difficulty, source"):
        Trainer(cfg, log=lambda m: None)


def test_dataset_column_named_like_a_reward_argument_is_warned_about_and_not_passed(tmp_path, monkeypatch):
    """A dataset column whose name the trainer passes itself (here `prompts`) is reported once at setup;
    reward functions receive the trainer's value (the prompt text) under that name, not the column."""
    import json

    from conftest import tiny_args
    from rtpo.cli import parse_args
    from rtpo.trainer import Trainer

    rows = [{"question": f"Compute {i}+1.", "reasoning": "", "answer": str(i + 1), "prompts": "column value"}
            for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "clash.py").write_text("def f(completions, *, prompts, **kw):\n"
                                       "    return [float(p != 'column value') for p in prompts]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    logs = []
    cfg = parse_args(tiny_args(tmp_path / "run", tmp_path / "cache", "--dataset", str(tmp_path / "d.jsonl"),
                               "--data.num_eval", "4", "--warmstart.enabled", "false",
                               "--rewards.custom", '{"clash:f": 1.0}'))
    t = Trainer(cfg, log=logs.append)
    assert sum("dataset column(s) 'prompts'" in m for m in logs) == 1 and "prompts" not in t.run.column_names
    assert set(t.scorer.score(t.sampler.rollout(0)).per_fn["clash:f"]) == {1.0}
