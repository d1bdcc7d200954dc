"""The typed config: files, CLI overrides, and errors that name the key."""

import json

import pytest

from rtpo.config import ConfigError, RTPOConfig, apply_dict
from rtpo.cli import parse_args


def test_cli_overrides_bare_dotted_and_aliases():
    """--lr maps to optim.lr (unique leaf), dotted keys and --key=value work, aliases resolve."""
    c = parse_args(["--lr", "1e-5", "--curriculum.schedule", "linear", "--model=foo/bar", "--G", "4",
                    "--log.progress", "false", "--rollout.stop_strings", "a,b"])
    assert c.optim.lr == 1e-5 and c.curriculum.schedule == "linear" and c.model.name == "foo/bar"
    assert c.rollout.num_generations == 4 and c.log.progress is False and c.rollout.stop_strings == ["a", "b"]


def test_yaml_and_json_files_then_cli_wins(tmp_path):
    """--config applies first; CLI overrides win; nested and flat keys both map."""
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 0.001\ncurriculum.schedule: piecewise\nrun:\n  max_steps: 7\n")
    c = parse_args(["--config", str(y), "--lr", "0.5"])
    assert c.optim.lr == 0.5 and c.curriculum.schedule == "piecewise" and c.run.max_steps == 7
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"rollout": {"num_generations": 3}}))
    assert parse_args(["--config", str(j)]).rollout.num_generations == 3


@pytest.mark.parametrize("argv,match", [
    (["--lrr", "1"], "unknown config key 'lrr'"),
    (["--optim.lrr", "1"], "unknown config key 'optim.lrr'"),
    (["--nosection.x", "1"], "unknown config section 'nosection'"),
    (["--lr", "fast"], "'optim.lr' expects float, got 'fast'"),
    (["--run.max_steps", "2.5"], "'run.max_steps' expects int"),
    (["--log.progress", "maybe"], "'log.progress' expects bool"),
    (["--loss.loss_type", "ppo"], "loss.loss_type = 'ppo' is not one of"),
    (["--rollout.num_generations", "1"], "G >= 2"),
    (["--curriculum.schedule", "zigzag"], "curriculum.schedule = 'zigzag'"),
    (["--curriculum.values", "[0.1,0.2]"], "curriculum.values needs"),
    (["--curriculum.floor", "1.5"], r"curriculum.floor = 1.5 must be in \[0, 1\]"),
    (["--rollout.max_new_tokens", "-3"], "rollout.max_new_tokens = -3 must be > 0"),
    (["--preset", "nope"], "--preset 'nope' is unknown"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_values_raise_clear_errors(argv, match):
    """Unknown or ill-typed keys and invalid values raise ConfigError naming the key."""
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)


def test_config_file_typo_names_file_and_key(tmp_path):
    """A typo'd key in a config file names the file and the key."""
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'optim.lrr'"):
        parse_args(["--config", str(p)])


def test_roundtrip_through_dict():
    """to_dict -> apply_dict reproduces the config."""
    c = parse_args(["--lr", "3e-4", "--curriculum.milestones", "[0.5]", "--curriculum.values", "[0.1, 1.0]"])
    assert apply_dict(RTPOConfig(), c.to_dict()) == c


def test_nested_lora_section_from_cli_files_and_saved_configs(tmp_path):
    """model.lora is a nested section: --model.lora.r / --lora.r, YAML nesting and a saved config.json
    all reach it; off (r = 0) by default; bad values name the nested key."""
    c = parse_args(["--lora.r", "8", "--model.lora.alpha", "32", "--lora.target_modules", "q_proj,v_proj"])
    assert (c.model.lora.r, c.model.lora.alpha, c.model.lora.target_modules) == (8, 32.0, ["q_proj", "v_proj"])
    assert RTPOConfig().model.lora.r == 0 and c.to_dict()["model"]["lora"]["r"] == 8
    assert apply_dict(RTPOConfig(), c.to_dict()) == c
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  lora:\n    r: 4\n    modules_to_save: [lm_head]\n")
    assert parse_args(["--config", str(y)]).model.lora.modules_to_save == ["lm_head"]
    for argv, match in [(["--lora.rank", "8"], r"unknown config key 'model.lora.rank'; model.lora has: r, alpha"),
                        (["--lora.r", "-1"], r"model.lora.r = -1 must be >= 0"),
                        (["--lora.r", "8", "--lora.dropout", "1"], r"model.lora.dropout = 1.0 must be in \[0, 1\)"),
                        (["--lora.r", "8", "--lora.bias", "some"], r"model.lora.bias = 'some' is not one of"),
                        (["--lora.r", "8", "--lora.alpha", "inf"], r"model.lora.alpha = inf must be a finite number"),
                        (["--lora.r", "8", "--lora.target_modules", "[]"], r"model.lora.target_modules is empty"),
                        (["--model.lora", "8"], r"config key 'model.lora' is a section: set its keys")]:
        with pytest.raises(ConfigError, match=match):
            parse_args(argv)
