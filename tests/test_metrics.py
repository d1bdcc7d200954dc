"""What the run writes for people to look at: samples.jsonl, per-reward-function metrics, and the
metrics mirrored to TensorBoard / Weights & Biases (`log.report_to`); metrics.jsonl stays the source."""

import importlib.util
import json
import sys
import types

import pytest

from rtpo.config import ConfigError
from rtpo.cli import parse_args
from rtpo.metrics import read_metrics
from rtpo.trainer import Trainer

from conftest import tiny_args


def run(argv):
    return Trainer(parse_args(argv), log=lambda m: None).train()


def strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def test_samples_jsonl_holds_train_groups_and_eval_rows_every_eval_step(tmp_path):
    """Every eval.every steps (0 and 2 of 4) samples.jsonl gets the first log.sample_groups groups'
    G completions (prompt with its hint, hint fraction, completion, reward per function, advantage)
    and log.sample_eval_rows held-out rows; the final evaluation adds eval rows at step 4. The
    values are the step's: rewards sum to metrics.jsonl's weighting, advantages are group-relative."""
    out = tmp_path / "run"
    run(tiny_args(out, tmp_path / "cache", "--log.sample_groups", "1", "--log.sample_eval_rows", "2"))
    rows = read_metrics(out / "samples.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    ev = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == [0, 0, 0, 2, 2, 2]  # 1 group x G = 3 at steps 0 and 2
    assert [r["step"] for r in ev] == [0, 0, 2, 2, 4, 4]
    for r in train:
        assert {"prompt", "keep", "completion", "rewards", "advantage", "answer", "injected_tokens"} <= set(r)
        assert set(r["rewards"]) == {"accuracy", "format"}
        assert r["reward"] == pytest.approx(r["rewards"]["accuracy"] + 0.1 * r["rewards"]["format"], abs=1e-6)
    assert train[0]["keep"] == 1.0 and train[0]["injected_tokens"] > 0
    assert "<think>" in train[0]["prompt"]  # prefix mode: the hint opens the assistant turn, in the prompt
    assert sum(r["advantage"] for r in train[:3]) == pytest.approx(0.0, abs=1e-5)
    assert all(r["keep"] == 0.0 and "<think>" not in r["prompt"] for r in ev)
    metrics = read_metrics(out / "metrics.jsonl")
    assert all("reward/accuracy" in r and "reward_std/accuracy" in r for r in metrics if "reward" in r)
    assert "eval/reward/format" in metrics[0]


def test_samples_jsonl_is_exact_across_resume(tmp_path):
    """4 steps == 2 steps + --resume + 2 steps: samples.jsonl rows are identical (rows logged after
    the resumed step are dropped first, as for metrics.jsonl)."""
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    run(tiny_args(a, cache, "--eval.every", "1"))
    run(tiny_args(b, cache, "--eval.every", "1", "--run.stop_after_steps", "3"))
    run(tiny_args(b, cache, "--eval.every", "1", "--resume", "auto"))
    assert read_metrics(a / "samples.jsonl") == read_metrics(b / "samples.jsonl")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason='needs tensorboard: pip install -e ".[tensorboard]"')
def test_tensorboard_event_file_holds_the_metrics_jsonl_values(tmp_path):
    """log.report_to tensorboard writes an event file under <run>/tensorboard whose scalars, read
    back with TensorBoard's own reader, are metrics.jsonl's values at the same steps (train metrics,
    per-function rewards and held-out evaluations)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run(tiny_args(out, tmp_path / "cache", "--log.report_to", "tensorboard"))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    rows = read_metrics(out / "metrics.jsonl")
    for key in ("reward", "reward/accuracy", "loss", "keep", "eval/accuracy", "eval/completion_tokens"):
        want = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 2, 4]


def test_wandb_gets_each_metrics_row_at_its_step_and_a_resumed_run_continues_its_run(tmp_path, monkeypatch):
    """log.report_to wandb (a stand-in module records the calls): one wandb.init per invocation with
    the project, the config and a run id kept in <run>/wandb_id (a resumed run reuses it, resume
    'allow'), then each metrics.jsonl row's numbers logged at its step, and finish()."""
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out, cache = tmp_path / "run", tmp_path / "cache"
    flags = ("--log.report_to", "wandb", "--log.project", "proj")
    run(tiny_args(out, cache, *flags, "--run.stop_after_steps", "2"))
    run(tiny_args(out, cache, *flags, "--resume", "auto"))
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [(i["project"], i["id"], i["resume"]) for i in inits] == [("proj", "abc123", "allow")] * 2
    assert inits[0]["config"]["log"]["report_to"] == "wandb"
    assert (out / "wandb_id").read_text() == "abc123"
    logged = [(c[1], c[2]) for c in calls if c[0] == "log"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [s for s, _ in logged] == [r["step"] for r in rows]
    assert logged[-1][1]["eval/accuracy"] == rows[-1]["eval/accuracy"]
    assert [c[0] for c in calls].count("finish") == 2


def test_report_to_without_its_package_is_one_line_naming_the_install(tmp_path, monkeypatch):
    """A missing backend stops at setup, before the output folder is touched, with one line naming
    the pip command; an unknown backend is a config error listing the choices."""
    import rtpo.metrics

    real = importlib.util.find_spec
    monkeypatch.setattr(rtpo.metrics.importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    with pytest.raises(ConfigError, match=r'log.report_to = tensorboard needs the tensorboard package: '
                                          r'pip install -e "\.\[tensorboard\]"'):
        Trainer(parse_args(tiny_args(tmp_path / "run", tmp_path / "cache", "--log.report_to", "tensorboard")))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="log.report_to = 'mlflow' is not one of: none, tensorboard, wandb"):
        parse_args(["--log.report_to", "mlflow"])
    json.dumps(rtpo.metrics.REPORT_TO_PACKAGES)  # plain data
