"""The typed config: files, CLI overrides, and errors that name the key."""

import json
import os

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
    (["--curriculum.reroll_keep", "1.5"], r"curriculum.reroll_keep = 1.5 must be in \[0, 1\]"),
    (["--rollout.dynamic_sampling", "-1"], "rollout.dynamic_sampling = -1 must be >= 0"),
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


# ------------------------------------------------------------------ every field, derived from the dataclasses
def _fields(obj=None, prefix=""):
    """(dotted key, declared type) of every leaf field of RTPOConfig, nested sections included."""
    import dataclasses
    import typing

    obj = obj if obj is not None else RTPOConfig()
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _fields(v, key)
        else:
            yield key, hints[f.name]


def _bad_values(key, tp):
    """Wrong-typed, non-finite, empty and out-of-range values for a field of type tp, as
    ("cli", string) for a command-line flag or ("file", value) for a typed YAML config file."""
    import typing

    from rtpo.config import EMPTY_OK, INT_MAX, SIGNED

    signed = key.split(".")[0] in SIGNED
    if typing.get_origin(tp) is not None and type(None) in typing.get_args(tp):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return [("cli", "maybe"), ("file", 2), ("file", [True])]
    if tp is int:
        out = [("cli", "x"), ("cli", "2.5"), ("cli", "nan"), ("cli", str(INT_MAX + 1)), ("file", "12abc"), ("file", [1])]
        return out + ([] if signed else [("cli", "-1")])
    if tp is float:
        out = [("cli", "x"), ("cli", "nan"), ("cli", "inf"), ("cli", "-inf"), ("file", [0.5]), ("file", True)]
        return out + ([] if signed else [("cli", "-1")])
    if tp is str:
        return ([] if key in EMPTY_OK else [("cli", "")]) + [("file", [1]), ("file", {"a": 1})]
    if origin is list:
        if args[0] is str:
            return [("cli", "[1]"), ("cli", '[""]'), ("cli", '[["a"]]'), ("file", 5), ("file", [None])]
        return [("cli", '["a"]'), ("cli", "[NaN]"), ("cli", "[Infinity]"), ("cli", "[-1]"), ("file", 5), ("file", [True])]
    if origin is dict:
        return [("cli", '{"m:f": NaN}'), ("cli", '{"m:f": "0.5"}'), ("cli", '{"": 1}'), ("cli", "[1]"),
                ("file", {"m:f": None}), ("file", {"m:f": [1]})]
    raise AssertionError(f"{key}: no bad values for type {tp}: teach this test (and config.check_types) the type")


def test_every_list_and_dict_field_declares_its_item_types():
    """check_types can only judge items whose type is declared: a field typed bare `list` or `dict`
    (e.g. added later) fails here, naming it."""
    import typing

    bare = [k for k, tp in _fields() if tp in (list, dict) or (typing.get_origin(tp) in (list, dict)
                                                               and not typing.get_args(tp))]
    assert not bare, f"declare item types, e.g. list[str]: {bare}"


BAD_FIELD_VALUES = [(k, how, v) for k, tp in _fields() for how, v in _bad_values(k, tp)]


def test_the_walk_covers_every_field():
    keys = {k for k, _ in _fields()}
    assert {k for k, _, _ in BAD_FIELD_VALUES} == keys and len(keys) > 100


@pytest.mark.parametrize("key,how,value", BAD_FIELD_VALUES,
                         ids=[f"{k}={how}:{v!r}" for k, how, v in BAD_FIELD_VALUES])
def test_every_config_field_refuses_bad_values_at_setup(key, how, value, tmp_path, capfd):
    """Each field of every config dataclass, given a wrong-typed, NaN/inf, empty or out-of-range value
    on the command line or in a YAML file: train.py exits 2 with one `error:` line naming the field,
    before anything is written (the output folder is never created)."""
    import yaml

    import train

    out = tmp_path / "out"
    if how == "cli":
        argv = [f"--{key}", value]
    else:
        sec, *rest = key.split(".")
        node = value
        for part in reversed(rest):
            node = {part: node}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({sec: node}))
        argv = ["--config", str(tmp_path / "bad.yaml")]
    if key != "run.output_dir":
        argv += ["--output_dir", str(out)]
    rc = train.main(argv)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
    assert rc == 2, err
    assert key in lines[0] or key.split(".")[-1] in lines[0], (key, lines[0])
    assert not out.exists() and os.listdir(tmp_path) in ([], ["bad.yaml"])
