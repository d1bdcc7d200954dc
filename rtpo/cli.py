"""Reading a config from the command line and from files: `--preset NAME`, `--config FILE`
(YAML or JSON), then `--key value` overrides, onto the typed config of rtpo/config.py."""

from __future__ import annotations

import json
import os
from typing import Optional

from rtpo.config import ConfigError, RTPOConfig, _field_type, apply_dict, resolve_key, set_value
from rtpo.presets import apply_preset


def load_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml  # a dependency of transformers

        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)  # one line: where and what, not YAML's multi-line report
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            what = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ConfigError(f"--config {path!r}: not valid YAML: {where}{what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path!r}: not valid JSON ({e}); YAML files must end in .yaml/.yml") from None


def parse_args(argv: list[str], base: Optional[RTPOConfig] = None) -> RTPOConfig:
    """`--config FILE` (applied first), `--preset NAME`, then `--key value` / `--key=value` overrides."""
    cfg = base or RTPOConfig()
    pairs: list[tuple[str, Optional[str]]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --key value")
        key = arg[2:]
        if "=" in key:
            key, val = key.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            val = argv[i + 1]
            i += 1
        else:
            val = None  # a bare flag: true for booleans
        pairs.append((key, val))
        i += 1
    for key, val in pairs:
        if key == "preset":
            apply_preset(cfg, val)
    for key, val in pairs:
        if key == "config":
            if val is None:
                raise ConfigError("--config needs a file path")
            apply_dict(cfg, load_file(val), source=val)
    for key, val in pairs:
        if key in ("config", "preset"):
            continue
        if val is None:
            sec, name = resolve_key(cfg, key)
            if _field_type(getattr(cfg, sec), name) is not bool:
                raise ConfigError(f"--{key} needs a value")
            val = "true"
        set_value(cfg, key, val)
    return cfg.validate()


def strip_launcher_args(argv: list) -> list:
    """The `deepspeed` launcher appends --local_rank=N to the script's arguments; the rank is in the
    environment too (LOCAL_RANK), so drop the flag instead of failing on an unknown config key."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
            continue
        if a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(a)
    return out
