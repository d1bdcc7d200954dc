"""rtpo.export: a checkpoint as an ordinary transformers model folder (LoRA: merged; see also
tests/test_lora.py::test_export_merges_and_eval_reads_a_lora_run)."""

import os

import pytest
import torch

from conftest import tiny_args

from rtpo.cli import parse_args
from rtpo.export import main
from rtpo.trainer import Trainer


def test_full_checkpoint_exports_its_weights_and_bad_targets_are_one_error_line(tmp_path, capsys):
    """A full fine-tuning run folder exports its newest checkpoint's weights unchanged (no trainer
    state); a missing folder and a run without checkpoints exit 2 with one `error:` line."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    Trainer(parse_args(tiny_args(out, tmp_path / "cache", "--max_steps", "1", "--eval.num_examples", "0")),
            log=lambda m: None).train()
    assert main([str(out), str(tmp_path / "exported")]) == 0
    files = set(os.listdir(tmp_path / "exported"))
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files and "trainer_state.pt" not in files
    a = load_file(out / "checkpoints" / "step_000001" / "model.safetensors")
    b = load_file(tmp_path / "exported" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "empty_run").mkdir()
    for target in (tmp_path / "nope", tmp_path / "empty_run"):
        capsys.readouterr()
        assert main([str(target), str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: checkpoint"), err
