"""rtpo.eval: greedy accuracy, format and reasoning length of any checkpoint at each hint fraction."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from rtpo.cli import parse_args
from rtpo.eval import main, parse_keeps, resolve_checkpoint
from rtpo.metrics import read_metrics
from rtpo.trainer import Trainer

from conftest import tiny_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step tiny run (final checkpoint at step 4, final evaluation in metrics.jsonl)."""
    d = tmp_path_factory.mktemp("eval")
    Trainer(parse_args(tiny_args(d / "run", d / "cache", "--rollout.max_new_tokens", "16",
                                 "--eval.max_new_tokens", "16")), log=lambda m: None).train()
    return d / "run"


def evaluate(args, capsys):
    rc = main([str(a) for a in args] + ["--no-progress", "--out", "-"])
    out = capsys.readouterr().out
    return rc, (json.loads(out) if rc == 0 else None)


def test_checkpoint_scores_what_its_run_scored_at_every_keep(trained, capsys):
    """Evaluating the run's final checkpoint with no hint reproduces the run's own final held-out
    evaluation (same rows, prompts, greedy decoding, scoring); the run's config supplies the
    dataset and prompt format. keep 1 injects the whole trace, keep 0.5 about half of it."""
    rc, rep = evaluate([trained / "checkpoints" / "step_000004", "--keep", "0,0.5,1"], capsys)
    assert rc == 0
    final = read_metrics(trained / "metrics.jsonl")[-1]
    r0, r5, r1 = rep["results"]
    assert [r["keep"] for r in rep["results"]] == [0.0, 0.5, 1.0] and r0["n"] == 4
    for k in ("accuracy", "format", "reasoning_tokens", "completion_tokens"):
        assert r0[k] == pytest.approx(final[f"eval/{k}"]), k
    assert r0["injected_tokens"] == 0 < r5["injected_tokens"] < r1["injected_tokens"]
    assert r1["samples"][0]["keep"] == 1.0 and "<think>" in r1["samples"][0]["prompt"]
    assert set(r0) >= {"reward/accuracy", "reward/format", "correct", "seconds"}


def test_run_folder_means_its_newest_checkpoint_and_the_table_is_printed(trained, capsys, tmp_path):
    """A run folder resolves to its newest complete checkpoint; without `--out -` a table is printed
    and `--out FILE` writes the JSON report."""
    kind, path, saved = resolve_checkpoint(str(trained), log=lambda m: None)
    assert kind == "checkpoint" and path.endswith("step_000004") and saved["run"]["max_steps"] == 4
    rc = main([str(trained), "--keep", "0", "--no-progress", "--out", str(tmp_path / "e.json")])
    out = capsys.readouterr().out
    assert rc == 0 and out.splitlines()[0].startswith("| keep | accuracy |")
    assert json.loads((tmp_path / "e.json").read_text())["results"][0]["keep"] == 0.0


def test_bad_input_is_one_error_line_exit_2(trained, capsys, tmp_path):
    """A missing folder, a hint fraction outside [0, 1] and an unknown config key each exit 2 with one
    `error:` line."""
    for args in ([tmp_path / "nope" / "x"], [trained, "--keep", "0,2"], [trained, "--optim.lrr", "1"]):
        assert main([str(a) for a in args] + ["--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: "), err
    assert parse_keeps("1, 0.5,0") == [1.0, 0.5, 0.0]


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason='needs peft: pip install -e ".[adapter]"')
def test_peft_adapter_is_merged_into_its_base_model(trained, capsys, tmp_path):
    """A LoRA adapter folder (adapter_config.json naming the checkpoint as base model) is loaded,
    merged and evaluated: its completions equal those of the same merged weights saved as an
    ordinary model folder, and differ from the base checkpoint's (the adapter is not a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rtpo.models import load_tokenizer

    base = str(trained / "checkpoints" / "step_000004")
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                            lora_alpha=64))
    lora.save_pretrained(tmp_path / "adapter")
    merged = lora.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    load_tokenizer(base).save_pretrained(tmp_path / "merged")
    common = ["--keep", "1", "--dataset", "embedded", "--data.num_eval", "4", "--eval.max_new_tokens", "16"]
    reports = []
    for target in (tmp_path / "adapter", tmp_path / "merged", base):
        rc, rep = evaluate([target] + common + ["--samples", "4"], capsys)
        assert rc == 0
        reports.append([s["completion"] for s in rep["results"][0]["samples"]])
    assert reports[0] == reports[1] and reports[0] != reports[2]


@pytest.mark.slow
def test_module_cli_runs(trained):
    """`python -m rtpo.eval RUN --keep 0,1 --out -` exits 0 and prints the JSON report."""
    p = subprocess.run([sys.executable, "-m", "rtpo.eval", str(trained), "--keep", "0,1", "--out", "-", "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["keep"] for r in json.loads(p.stdout)["results"]] == [0.0, 1.0]
