"""Loading and validating reasoning datasets."""

import json

import pytest

from rtpo.config import DataConfig
from rtpo.data import DataError, load_splits, split_gsm8k, validate_rows
from rtpo.synthetic import make_dataset


def test_synthetic_trace_states_the_answer_last_and_is_deterministic():
    """Each trace line is a correct step; the last line ends with the answer; same seed -> same rows."""
    rows = make_dataset(200, seed=5)
    assert rows == make_dataset(200, seed=5) and rows != make_dataset(200, seed=6)
    for r in rows:
        expr = r["question"][len("Compute "):-1]
        assert str(eval(expr)) == r["answer"]  # test-only check of the generator
        lines = r["reasoning"].split("\n")
        for line in lines:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs)
        assert lines[-1].endswith("=" + r["answer"])


def test_embedded_splits_are_disjoint():
    """No eval question appears in the training rows."""
    train, ev = load_splits(DataConfig())
    assert len(ev) == DataConfig().num_eval and not ({e.question for e in ev} & {e.question for e in train})


def test_gsm8k_format():
    """'reasoning #### answer' splits; calculator annotations are dropped; commas leave the answer."""
    reasoning, answer = split_gsm8k("She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,024")
    assert reasoning == "She sold 48/2 = 24 clips." and answer == "1024"
    ex = validate_rows([{"question": "q?", "answer": "r\n#### 5"}], DataConfig(), "x")
    assert ex[0].reasoning == "r" and ex[0].answer == "5"


@pytest.mark.parametrize("rows,match", [
    ([{"question": "q", "reasoning": "r"}], "row 0 has no field 'answer'"),
    ([{"question": "q", "reasoning": "r", "answer": "1"}, {"question": " ", "reasoning": "r", "answer": "1"}],
     "row 1 field 'question'"),
    ([{"question": "q", "reasoning": 5, "answer": "1"}], "row 0 field 'reasoning' .* must be text"),
    ([{"question": "q", "reasoning": "r", "answer": ""}], "row 0 field 'answer' .* is empty"),
    ([{"question": "q", "reasoning": "r", "answer": ["1"]}], "row 0 field 'answer' .* text or a number"),
    (["just a string"], "row 0 is a str"),
])
def test_bad_rows_name_row_and_field(rows, match):
    with pytest.raises(DataError, match=match):
        validate_rows(rows, DataConfig(format="fields"), "src")


def test_empty_reasoning_and_numeric_answers_allowed():
    ex = validate_rows([{"question": "q", "reasoning": None, "answer": 3}], DataConfig(format="fields"), "x")
    assert ex[0].reasoning == "" and ex[0].answer == "3"


def test_local_jsonl_with_renamed_fields(tmp_path):
    """A local JSONL file with custom field names loads; the last num_eval rows are held out."""
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"q": f"Q{i}", "cot": f"step {i}", "a": str(i)}) for i in range(10)))
    cfg = DataConfig(dataset=str(p), question_field="q", reasoning_field="cot", answer_field="a", num_eval=3)
    train, ev = load_splits(cfg)
    assert [e.answer for e in ev] == ["7", "8", "9"] and len(train) == 7


@pytest.mark.parametrize("content,match", [
    (b"", "has no rows"),
    (b'{"question": "caf\xe9"}\n', "not UTF-8"),
])
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_splits(DataConfig(dataset=str(p)))


def test_missing_file_and_wrong_extension(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_splits(DataConfig(dataset=str(tmp_path / "none.jsonl")))
    p = tmp_path / "d.txt"
    p.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_splits(DataConfig(dataset=str(p)))


def test_generated_datasets_hold_out_a_test_and_a_validation_split():
    """The embedded task has two held-out splits: `test` (default, reported) and `validation` (for
    tuning), disjoint from each other and from train; any other eval_split is one clear error."""
    from rtpo.config import DataConfig
    from rtpo.data import DataError, load_splits

    train, test = load_splits(DataConfig(num_eval=64))
    _, val = load_splits(DataConfig(num_eval=64, eval_split="validation"))
    q = lambda rows: {e.question for e in rows}  # noqa: E731
    assert len(test) == len(val) == 64 and q(test) != q(val)
    assert not q(train) & q(test)
    with pytest.raises(DataError, match="'test'.*'validation'"):
        load_splits(DataConfig(eval_split="dev"))
