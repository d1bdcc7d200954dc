"""One typed config for a run.

`RTPOConfig` is a tree of dataclasses. YAML/JSON files and `--section.key value` command-line
overrides map onto it; a key that names a field in only one section may be given bare
(`--lr 1e-5` is `--optim.lr 1e-5`). Unknown or ill-typed keys raise `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and the fix."""


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 150            # training steps; one step = one rollout batch + its updates
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    dtype: str = "auto"             # auto (bf16 on GPUs that have it, else fp32) | float32 | bfloat16 | float16
    resume: Optional[str] = None    # a run dir or checkpoint dir; "auto" = newest in output_dir
    overwrite: bool = False         # allow training into an output_dir that already holds a run
    deepspeed: Optional[str] = None  # path to a DeepSpeed JSON config (see ds_configs/)
    num_threads: int = 0            # torch CPU threads; 0 = auto (1 for models < 20M parameters on CPU, else torch's default)
    max_consecutive_skips: int = 3  # non-finite loss/grad: stop after this many skipped steps in a row
    stop_after_steps: int = 0       # save and exit after this many steps of this invocation (0 = off)


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT, `pip install -e ".[lora]"`): with r > 0 only the low-rank adapters on
    target_modules (and modules_to_save) train; the base weights stay frozen and, with loss.beta > 0,
    serve as the reference policy (adapters disabled), so no second copy of the model is held."""
    r: int = 0                      # rank; 0 = off (full fine-tuning)
    alpha: float = 16.0             # the adapter's output is scaled by alpha / r
    # 0 by default: dropout makes the no-grad old/reference passes and the update's forward disagree
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    bias: str = "none"              # none | all | lora_only: which biases train too
    modules_to_save: list[str] = field(default_factory=list)  # whole modules trained and saved beside the adapter


@dataclass
class ModelConfig:
    name: str = "embedded"          # "embedded" | "embedded-vl" (tiny Qwen2-VL) | hub name | local folder | file.gguf | preset name
    revision: Optional[str] = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # sizes of the embedded tiny model (Qwen2 architecture)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    lora: LoraConfig = field(default_factory=LoraConfig)  # --model.lora.r 8 (or --lora.r 8) turns LoRA on
    # Vision-language models: the vision encoder (patch embedding and blocks) stays fixed in the warm-start
    # and in RL; the merger and the language model learn (as VLM RL recipes usually do). Trained, the embedded
    # VLM's tiny encoder collapsed: from scratch in the warm-start to image-independent features (answers at
    # the majority class), and in RL its first updates broke the warm-started counting (accuracy 1.0 -> 0.19).
    freeze_vision_encoder: bool = True
    max_pixels: int = 0             # vision-language models: resize images to at most this many pixels (0 = the
                                    # image processor's own limit; each 28x28 pixels is one image token in Qwen2-VL)


@dataclass
class DataConfig:
    dataset: str = "embedded"       # "embedded" | "wordproblems" | "shapes" (images) | local .json/.jsonl/.csv/.parquet | hub name
    subset: Optional[str] = None    # hub dataset config name (e.g. "main" for openai/gsm8k)
    split: str = "train"
    eval_split: Optional[str] = None  # None: hold out `num_eval` rows of `split`
    format: str = "auto"            # auto | fields | gsm8k ("reasoning #### answer" in answer_field)
    question_field: str = "question"
    reasoning_field: str = "reasoning"
    answer_field: str = "answer"
    image_field: str = "auto"       # column of a row's images (path, bytes, PIL image, or a list); auto = "image"
                                    # or "images" if the rows have one; none = ignore images
    num_train: int = 0              # 0 = all rows
    num_eval: int = 256
    max_prompt_tokens: int = 512    # question + injected reasoning; longer reasoning is cut, and counted
    system_prompt: Optional[str] = None
    shuffle: bool = True
    # the generated tasks: embedded (rtpo/synthetic.py) and wordproblems (rtpo/wordproblems.py)
    synthetic_size: int = 4000
    min_operands: int = 3
    max_operands: int = 5
    max_operand: int = 9
    modulus: int = 10               # embedded task: values modulo this (one digit each); 0 = plain integers


@dataclass
class WarmstartConfig:
    """Supervised warm-start on a disjoint split, so a random tiny model knows the format."""
    enabled: str = "auto"           # auto (on for the embedded model) | true | false
    steps: int = 1200
    lr: float = 1.5e-3
    batch_size: int = 32
    num_examples: int = 4000
    seed: int = 0                   # seeds the embedded model's init and the SFT order: the warm-started
                                    # model stands in for a pretrained checkpoint, the same for every run.seed
    cache_dir: str = ".cache/rtpo"  # the warm-started model is cached here, keyed by its settings
    # What the warm-start teaches: every example shows its trace until mix_from of the steps, then only
    # reasoning_fraction of them do and the rest are answer-only (<think></think> answer). The model
    # can write the steps but mostly answers directly: choosing to reason is left to RL.
    reasoning_fraction: float = 0.3
    mix_from: float = 0.67
    max_operands: int = 0           # > 0: warm-start questions have at most this many operands (shorter chains)


@dataclass
class SftConfig:
    """Supervised training on the RL split's traces (hint-free prompt -> whole response) before the first RL
    step of a fresh run: the SFT -> GRPO baseline for the same data. steps 0 = none."""
    steps: int = 0
    lr: float = 1.5e-3
    batch_size: int = 8


@dataclass
class CurriculumConfig:
    """keep(step) = 1 - f(r), r = min(max(step - warmup_steps, 0) / anneal_steps, 1); see curriculum.py."""
    schedule: str = "cosine"        # constant | linear | cosine | exponential | piecewise | adaptive | none
    anneal_steps: int = 0           # 0 = computed: 75% of the steps after warmup (the rest run with no hint)
    anneal_fraction: float = 0.75
    warmup_steps: int = 0
    floor: float = 0.0              # keep never goes below this
    value: float = 1.0              # keep for `constant`
    decay_rate: float = 5.0         # k for `exponential`
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])
    values: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.8, 1.0])
    granularity: str = "token"      # token | line (the kept part never ends mid-line)
    injection: str = "prefix"       # prefix (hint opens the assistant turn) | turn (a closed earlier turn)
    think_open: str = "<think>"
    think_close: str = "</think>"
    # adaptive: keep drops by `adaptive_step` while batch accuracy >= target, holds otherwise, never above linear
    adaptive_target: float = 0.7
    adaptive_step: float = 0.02
    # Hints that adapt to each example (beyond the original; see README "Hints that adapt").
    # per_example: each example's keep follows its own group results, capped by the schedule above:
    # after an all-wrong group it grows by per_example_step, after a group accuracy >= per_example_target
    # it shrinks by per_example_step (the schedule's keep is its ceiling, so keep 0 at the end is hint-free).
    per_example: bool = False
    per_example_step: float = 0.25
    per_example_target: float = 0.5
    hint_dropout: float = 0.0       # fraction of each group's rows that get no hint (they train the eval prompt)
    # An example's own keep before its first group. 0 with per_example = hints on demand (BREAD / NuRL):
    # no hint until the example's group is all wrong, then a hint that grows per failure, shrinks per success.
    per_example_start: float = 1.0
    # Hint re-roll (BREAD-style, rtpo/refill.py): an all-wrong group whose keep is below this is sampled again
    # in the same step with this fraction of its trace in the prompt; 0 = off.
    reroll_keep: float = 0.0


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8       # distinct prompts per training step
    num_generations: int = 8        # G completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_strings: list[str] = field(default_factory=list)
    share_prefix: bool = True
    cache: str = "dynamic"          # dynamic | static
    batch_size: int = 0             # rows decoded at once; 0 = all
    # DAPO dynamic sampling (rtpo/refill.py): up to this many extra rounds of new prompts per step replace
    # groups whose G rewards are all equal; 0 = off.
    dynamic_sampling: int = 0


@dataclass
class LossConfig:
    loss_type: str = "dapo"         # grpo | dapo | dr_grpo
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    beta: float = 0.0               # KL weight; 0 = no reference model is built or run
    scale_rewards: str = "group"    # group | batch | none
    adv_eps: float = 1e-4
    num_iterations: int = 1         # passes over each rollout batch
    entropy_coef: float = 0.0
    # weight of a log-likelihood loss on the injected hint tokens (UFT-style). 1 since round 4: the setting
    # benchmarks/rtpo_vs_grpo.py recommends (README "Benchmarks"); 0 = the curriculum alone, as the original work
    hint_loss: float = 1.0
    # Prefix-RFT: the injected hint is part of each hinted row's trajectory and its tokens get that row's
    # advantage in the policy loss (off-policy tokens, clipped like the rest); with hint_top_entropy < 1 only
    # that fraction of a row's hint tokens (the highest-entropy ones) do. Needs rows without the hint in the
    # group (curriculum.hint_dropout > 0): when all G rows share the hint, the advantages sum to 0 on it.
    hint_advantage: bool = False
    hint_top_entropy: float = 1.0
    # Same traces, no hint (GRPO + SFT loss): a log-likelihood loss on each step example's whole response
    # (think opener, trace, answer, EOS) after its hint-free prompt; sft_decay linear scales it by 1 - r,
    # r the curriculum's anneal progress (CHORD-style: 0 once the anneal ends).
    sft_loss: float = 0.0
    sft_decay: str = "none"         # none | linear
    importance: str = "token"       # token (PPO/GRPO ratio per token) | sequence (GSPO: length-normalised sequence ratio)
    tis_cap: float = 0.0            # > 0: truncated importance sampling against the rollout's own log-probs, weight <= cap
    tis_level: str = "token"        # token | sequence: the TIS weight per token, or one per sequence


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    lr_schedule: str = "constant"   # constant | linear | cosine
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 16      # sequences per forward/backward; gradients accumulate to the step
    micro_batch_tokens: int = 0     # > 0: micro batches of at most this many real tokens instead (see README)
    mini_batches: int = 1           # optimizer updates per pass over a rollout batch
    packing: bool = True            # log-prob passes on packed rows (no padding per completion), where the model allows
    share_prefix: bool = True       # packed: each distinct prompt encoded once per micro batch, its completions attend to it


@dataclass
class RewardConfig:
    """Weights of the built-in rewards; extra user functions as "module:function" = weight."""
    accuracy: float = 1.0
    format: float = 0.1
    length_penalty: float = 0.0     # weight of -(completion tokens / max_new_tokens)
    custom: dict[str, float] = field(default_factory=dict)
    boxed: float = 0.0              # strict \boxed{answer}
    gsm8k: float = 0.0              # strict "#### answer"
    json_answer: float = 0.0        # ```json {"answer": ...}``` block (the original work's format)


@dataclass
class EvalConfig:
    every: int = 20                 # steps between held-out evals (0 = only at the start and end)
    num_examples: int = 256
    max_new_tokens: int = 96
    batch_size: int = 64


@dataclass
class LogConfig:
    progress: bool = True
    plot: bool = True
    report_to: str = "none"         # none | tensorboard | wandb (metrics.jsonl is always written)
    project: str = "rtpo"           # wandb project
    sample_groups: int = 2          # train groups written to samples.jsonl every eval.every steps
    sample_eval_rows: int = 4       # held-out rows written to samples.jsonl at each evaluation


@dataclass
class CheckpointConfig:
    every: int = 50                 # steps between checkpoints (0 = only at the end)
    keep_last: int = 2


@dataclass
class RTPOConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "RTPOConfig":
        validate(self)
        return self


# Bare CLI keys that would otherwise be ambiguous or name a section.
ALIASES = {
    "model": "model.name",
    "lr": "optim.lr",
    "max_steps": "run.max_steps",
    "dataset": "data.dataset",
    "output_dir": "run.output_dir",
    "resume": "run.resume",
    "seed": "run.seed",
    "deepspeed": "run.deepspeed",
    "G": "rollout.num_generations",
    "schedule": "curriculum.schedule",
    "beta": "loss.beta",
    "eval_every": "eval.every",
    "save_every": "checkpoint.every",
}


# Nested sections reachable without their parent's name: --lora.r 8 is --model.lora.r 8.
NESTED = {"lora": "model"}


def _sections(cfg: RTPOConfig):
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def resolve_key(cfg: RTPOConfig, key: str) -> tuple[str, str]:
    """Map "lr" / "optim.lr" / "optim-lr" to ("optim", "lr"); raise ConfigError for unknown keys."""
    key = ALIASES.get(key, key).replace("-", "_")
    if key.split(".")[0] in NESTED:  # "lora.r" -> "model.lora.r"
        key = f"{NESTED[key.split('.')[0]]}.{key}"
    sections = _sections(cfg)
    if "." in key:
        sec, _, name = key.partition(".")
        if sec not in sections:
            raise ConfigError(f"unknown config section {sec!r} in key {key!r}; sections: {', '.join(sections)}")
        obj, path = sections[sec], name.split(".")
        for i, part in enumerate(path):  # a nested section (model.lora) is walked part by part
            if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
                where = ".".join([sec] + path[:i])
                names = ", ".join(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else "no keys"
                raise ConfigError(f"unknown config key {key!r}; {where} has: {names}")
            if i < len(path) - 1:
                obj = getattr(obj, part)
        return sec, name
    owners = [s for s, obj in sections.items() if key in {f.name for f in dataclasses.fields(obj)}]
    if len(owners) == 1:
        return owners[0], key
    if not owners:
        raise ConfigError(f"unknown config key {key!r}; use section.key, e.g. optim.lr (see README, config reference)")
    raise ConfigError(f"ambiguous config key {key!r}: it exists in {', '.join(owners)}; write e.g. {owners[0]}.{key}")


def _field_type(obj, name: str):
    """The type of field `name` of `obj`; a dotted name ("lora.r") is looked up in the nested section."""
    *parents, name = name.split(".")
    for p in parents:
        obj = getattr(obj, p)
    hints = typing.get_type_hints(type(obj))
    return hints[name]


def coerce(value: Any, tp, key: str) -> Any:
    """Convert a value (a CLI string or a parsed YAML/JSON value) to the field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, args[0], key)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, str):  # "100", "1e3" and "2.0" are ints; "2.5" is not
                value = float(value) if any(ch in value.lower() for ch in ".e") else int(value)
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                value = int(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if tp is list or origin is list:
            elem = (typing.get_args(tp) or (None,))[0]
            if isinstance(value, str) and not value.strip().startswith("["):  # a,b,c: items typed by the field
                value = [v for v in value.split(",") if v]
                return [coerce(v, elem, key) for v in value] if elem not in (None, str) else value
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return list(value)  # JSON/YAML items keep their own types: check_types judges them
        if tp is dict or origin is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        pass
    else:
        return value
    tname = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"config key {key!r} expects {tname}, got {value!r}")


def set_value(cfg: RTPOConfig, key: str, value: Any) -> None:
    sec, name = resolve_key(cfg, key)
    obj = getattr(cfg, sec)
    *parents, leaf = name.split(".")
    for p in parents:
        obj = getattr(obj, p)
    if dataclasses.is_dataclass(getattr(obj, leaf)):  # a whole nested section: {"r": 8, "alpha": 16}
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if not isinstance(value, dict):
            full = f"{sec}.{name}"
            raise ConfigError(f"config key {full!r} is a section: set its keys, e.g. --{full}."
                              f"{dataclasses.fields(getattr(obj, leaf))[0].name} VALUE")
        for k, v in value.items():
            set_value(cfg, f"{sec}.{name}.{k}", v)
        return
    setattr(obj, leaf, coerce(value, _field_type(obj, leaf), f"{sec}.{name}"))


def apply_dict(cfg: RTPOConfig, data: dict, source: str = "config") -> RTPOConfig:
    """Apply a nested ({"optim": {"lr": 1e-5}}) or flat ({"optim.lr": 1e-5}) mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    sections = _sections(cfg)
    for k, v in data.items():
        if k in sections and isinstance(v, dict):
            for kk, vv in v.items():
                try:
                    set_value(cfg, f"{k}.{kk}", vv)
                except ConfigError as e:
                    raise ConfigError(f"{source}: {e}") from None
        else:
            try:
                set_value(cfg, k, v)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return cfg


def _choice(value, choices, key):
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not one of: {', '.join(map(str, choices))}")


def _positive(value, key, allow_zero=False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} = {value!r} must be {'>= 0' if allow_zero else '> 0'}")


# --- every field by its declared type and range, derived from the dataclasses ---------------------
# Strings are non-empty except these (an empty system prompt replaces a template's default one).
EMPTY_OK = frozenset({"data.system_prompt"})
# Numbers are >= 0 except in these sections and fields (reward weights may be negative: a penalty).
SIGNED = frozenset({"rewards"})
INT_MAX = 2**31 - 1  # no count, size or seed of a run is larger; numpy seeds must be < 2**32


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return {bool: "true/false", int: "integer", float: "number", str: "non-empty string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _bad(key: str, value, tp, why: str = "", default=dataclasses.MISSING) -> ConfigError:
    hint = f"; the default is {default!r}" if default is not dataclasses.MISSING else ""
    return ConfigError(f"{key} = {value!r} {why or 'has the wrong type'}: expects {_type_name(tp)}{hint}")


def _check_value(key: str, value, tp, signed: bool, empty_ok: bool, default, ranges: bool = True) -> None:
    """Raise ConfigError if `value` is not of type `tp` (or out of the generic range)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        inner = [a for a in args if a is not type(None)]
        return _check_value(key, value, inner[0], signed, empty_ok, default, ranges)
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(key, value, tp, default=default)
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(key, value, tp, default=default)
        if ranges and not signed and value < 0:
            raise _bad(key, value, tp, "must be >= 0", default)
        if ranges and abs(value) > INT_MAX:
            raise _bad(key, value, tp, f"is out of range (at most {INT_MAX})", default)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(key, value, tp, default=default)
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {value} must be a finite number")
        if ranges and not signed and value < 0:
            raise _bad(key, value, tp, "must be >= 0", default)
    elif tp is str:
        if not isinstance(value, str):
            raise _bad(key, value, tp, default=default)
        if value == "" and not empty_ok:
            raise _bad(key, value, tp, "is empty", default)
    elif origin is list or tp is list:
        if not isinstance(value, list):
            raise _bad(key, value, tp, default=default)
        for i, v in enumerate(value):
            if args:
                _check_value(f"{key}[{i}]", v, args[0], signed, False, dataclasses.MISSING, ranges)
    elif origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _bad(key, value, tp, default=default)
        for k, v in value.items():
            if args:
                _check_value(f"{key} key {k!r}", k, args[0], signed, False, dataclasses.MISSING, ranges)
                _check_value(f"{key}[{k!r}]", v, args[1], signed, False, dataclasses.MISSING, ranges)
    elif dataclasses.is_dataclass(tp):
        if not dataclasses.is_dataclass(value):
            raise _bad(key, value, tp, "is a section: set its keys", default)
        check_types(value, key, ranges)


def check_types(obj, prefix: str = "", ranges: bool = True) -> None:
    """Every field of dataclass `obj` (and its nested sections) against its declared type: bools,
    integers (not bools), finite numbers, non-empty strings (except EMPTY_OK), lists and dicts item by
    item; numbers >= 0 outside SIGNED and integers at most INT_MAX. Derived from the annotations, so a
    field added to a config dataclass is checked without a line here."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if dataclasses.is_dataclass(default):
            default = dataclasses.MISSING
        signed = key.split(".")[0] in SIGNED or key in SIGNED
        _check_value(key, getattr(obj, f.name), hints[f.name], signed, key in EMPTY_OK, default, ranges)


def validate(cfg: RTPOConfig) -> None:
    """Every field by its declared type (check_types), then the ranges and cross-field checks a type
    cannot express; each error names the key and the fix."""
    check_types(cfg, ranges=False)  # types first: the checks below compare values
    _check_choices(cfg)
    _check_signs(cfg)
    _check_ranges(cfg)
    _check_lora(cfg.model.lora)
    _check_trace_losses(cfg)
    check_types(cfg)  # then the generic range of every field the checks above do not name


def _check_trace_losses(c: RTPOConfig) -> None:
    """The knobs that use the dataset's traces besides the prompt hint (hint advantage, SFT loss, SFT first)."""
    _choice(c.loss.sft_decay, ["none", "linear"], "loss.sft_decay")
    for key, v in [("loss.sft_loss", c.loss.sft_loss), ("sft.steps", c.sft.steps),
                   ("rollout.dynamic_sampling", c.rollout.dynamic_sampling)]:
        _positive(v, key, allow_zero=True)
    for key, v in [("sft.lr", c.sft.lr), ("sft.batch_size", c.sft.batch_size)]:
        _positive(v, key)
    for key, v in [("loss.hint_top_entropy", c.loss.hint_top_entropy),
                   ("curriculum.per_example_start", c.curriculum.per_example_start),
                   ("curriculum.reroll_keep", c.curriculum.reroll_keep)]:
        if not 0 <= v <= 1:
            raise ConfigError(f"{key} = {v} must be in [0, 1]")
    if c.loss.hint_advantage and c.curriculum.injection != "prefix":
        raise ConfigError("loss.hint_advantage = true needs curriculum.injection = prefix (the hint must be the start "
                          "of the response it is credited to); use --curriculum.injection prefix")
    if c.loss.hint_advantage and c.loss.tis_cap > 0:
        raise ConfigError("loss.hint_advantage = true with loss.tis_cap > 0: hint tokens have no sampler log-probs to "
                          "correct against; use one of the two")
    if c.sft.steps and c.loss.beta > 0:
        raise ConfigError("sft.steps > 0 with loss.beta > 0 is not supported (the KL reference would have to be the "
                          "post-SFT model on resume too); use --loss.beta 0")


def _check_lora(lc: LoraConfig) -> None:
    """model.lora: the settings PEFT would otherwise reject deep inside model loading."""
    if lc.r < 0:
        raise ConfigError(f"model.lora.r = {lc.r} must be >= 0 (0 = no LoRA: full fine-tuning; 8 is a common rank)")
    if lc.r == 0:
        return
    if lc.alpha <= 0:
        raise ConfigError(f"model.lora.alpha = {lc.alpha} must be > 0 (the adapter is scaled by alpha / r; "
                          "common: 2 * r)")
    if not 0 <= lc.dropout < 1:
        raise ConfigError(f"model.lora.dropout = {lc.dropout} must be in [0, 1)")
    _choice(lc.bias, ["none", "all", "lora_only"], "model.lora.bias")
    for key, names in (("target_modules", lc.target_modules), ("modules_to_save", lc.modules_to_save)):
        if any(not isinstance(n, str) or not n.strip() for n in names):
            raise ConfigError(f"model.lora.{key} = {names!r} must be module names, e.g. q_proj,k_proj,v_proj,o_proj")
    if not lc.target_modules:
        raise ConfigError("model.lora.target_modules is empty: name the linear layers to adapt, e.g. "
                          "--model.lora.target_modules q_proj,k_proj,v_proj,o_proj (or set model.lora.r 0)")


def _check_choices(cfg: RTPOConfig) -> None:
    from rtpo.advantages import SCALE_REWARDS
    from rtpo.curriculum import SCHEDULES
    from rtpo.losses import IMPORTANCE, LOSS_TYPES

    c = cfg
    def finite(prefix, obj):  # "nan" / "inf" parse as floats and would poison the run
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                finite(f"{prefix}.{f.name}", v)
            elif isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{prefix}.{f.name} = {v} must be a finite number")

    for sec, obj in _sections(c).items():
        finite(sec, obj)
    _choice(c.loss.loss_type, sorted(LOSS_TYPES), "loss.loss_type")
    _choice(c.loss.scale_rewards, sorted(SCALE_REWARDS), "loss.scale_rewards")
    _choice(c.loss.importance, sorted(IMPORTANCE), "loss.importance")
    _choice(c.loss.tis_level, ["token", "sequence"], "loss.tis_level")
    _choice(c.log.report_to, ["none", "tensorboard", "wandb"], "log.report_to")
    _choice(c.curriculum.schedule, sorted(SCHEDULES), "curriculum.schedule")
    _choice(c.curriculum.granularity, ["token", "line"], "curriculum.granularity")
    _choice(c.curriculum.injection, ["prefix", "turn"], "curriculum.injection")
    _choice(c.optim.lr_schedule, ["constant", "linear", "cosine"], "optim.lr_schedule")
    _choice(c.rollout.cache, ["dynamic", "static"], "rollout.cache")
    _choice(c.data.format, ["auto", "fields", "gsm8k"], "data.format")
    _choice(c.warmstart.enabled, ["auto", "true", "false"], "warmstart.enabled")
    _choice(c.run.dtype, ["auto", "float32", "bfloat16", "float16"], "run.dtype")


def _check_signs(c: RTPOConfig) -> None:
    for key, v in [("run.max_steps", c.run.max_steps), ("rollout.prompts_per_step", c.rollout.prompts_per_step),
                   ("rollout.max_new_tokens", c.rollout.max_new_tokens), ("optim.micro_batch_size", c.optim.micro_batch_size),
                   ("optim.mini_batches", c.optim.mini_batches), ("loss.num_iterations", c.loss.num_iterations),
                   ("data.max_prompt_tokens", c.data.max_prompt_tokens), ("eval.max_new_tokens", c.eval.max_new_tokens),
                   ("eval.batch_size", c.eval.batch_size), ("optim.lr", c.optim.lr),
                   ("curriculum.decay_rate", c.curriculum.decay_rate)]:
        _positive(v, key)
    for key, v in [("loss.beta", c.loss.beta), ("rollout.temperature", c.rollout.temperature),
                   ("rollout.top_k", c.rollout.top_k), ("curriculum.warmup_steps", c.curriculum.warmup_steps),
                   ("curriculum.anneal_steps", c.curriculum.anneal_steps), ("eval.every", c.eval.every),
                   ("eval.num_examples", c.eval.num_examples), ("checkpoint.every", c.checkpoint.every),
                   ("data.num_train", c.data.num_train), ("data.num_eval", c.data.num_eval), ("data.modulus", c.data.modulus),
                   ("optim.max_grad_norm", c.optim.max_grad_norm), ("optim.weight_decay", c.optim.weight_decay),
                   ("loss.epsilon_low", c.loss.epsilon_low), ("loss.epsilon_high", c.loss.epsilon_high),
                   ("rollout.batch_size", c.rollout.batch_size), ("warmstart.steps", c.warmstart.steps),
                   ("loss.entropy_coef", c.loss.entropy_coef), ("loss.hint_loss", c.loss.hint_loss), ("run.stop_after_steps", c.run.stop_after_steps),
                   ("checkpoint.keep_last", c.checkpoint.keep_last), ("run.num_threads", c.run.num_threads),
                   ("optim.lr_warmup_steps", c.optim.lr_warmup_steps), ("optim.eps", c.optim.eps),
                   ("optim.micro_batch_tokens", c.optim.micro_batch_tokens),
                   ("model.max_pixels", c.model.max_pixels)]:
        _positive(v, key, allow_zero=True)
    for key, v in [("loss.tis_cap", c.loss.tis_cap), ("log.sample_groups", c.log.sample_groups),
                   ("log.sample_eval_rows", c.log.sample_eval_rows)]:
        _positive(v, key, allow_zero=True)
    # > 0: adv_eps = 0 divides a zero-variance group by 0 (NaN advantages, every update skipped);
    # max_consecutive_skips = 0 would stop after the first step.
    for key, v in [("loss.adv_eps", c.loss.adv_eps), ("run.max_consecutive_skips", c.run.max_consecutive_skips),
                   ("warmstart.lr", c.warmstart.lr), ("warmstart.batch_size", c.warmstart.batch_size),
                   ("data.synthetic_size", c.data.synthetic_size)]:
        _positive(v, key)
    for key, v in [("optim.beta1", c.optim.beta1), ("optim.beta2", c.optim.beta2)]:
        if not 0 <= v < 1:
            raise ConfigError(f"{key} = {v} must be in [0, 1) (AdamW moment decay); the default is "
                              f"{getattr(OptimConfig(), key.split('.')[1])}")


def _check_ranges(c: RTPOConfig) -> None:
    if c.rollout.num_generations < 2:
        raise ConfigError(
            f"rollout.num_generations = {c.rollout.num_generations}: group-relative advantages need G >= 2 "
            "(with G = 1 every advantage is 0 and nothing is learned); set --rollout.num_generations 2 or more")
    if c.rollout.temperature == 0:
        raise ConfigError("rollout.temperature = 0 makes all G completions identical; use > 0 for training rollouts")
    if not 0 < c.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p = {c.rollout.top_p} must be in (0, 1]")
    if c.loss.epsilon_low >= 1:
        raise ConfigError(f"loss.epsilon_low = {c.loss.epsilon_low} must be < 1 (the ratio is clipped at 1 - epsilon_low)")
    for key, v in [("curriculum.floor", c.curriculum.floor), ("curriculum.value", c.curriculum.value),
                   ("curriculum.anneal_fraction", c.curriculum.anneal_fraction),
                   ("curriculum.adaptive_target", c.curriculum.adaptive_target),
                   ("curriculum.adaptive_step", c.curriculum.adaptive_step),
                   ("curriculum.per_example_step", c.curriculum.per_example_step),
                   ("curriculum.per_example_target", c.curriculum.per_example_target),
                   ("curriculum.hint_dropout", c.curriculum.hint_dropout),
                   ("warmstart.reasoning_fraction", c.warmstart.reasoning_fraction),
                   ("warmstart.mix_from", c.warmstart.mix_from)]:
        if not 0 <= v <= 1:
            raise ConfigError(f"{key} = {v} must be in [0, 1]")
    m, vals = c.curriculum.milestones, c.curriculum.values
    if len(vals) != len(m) + 1:
        raise ConfigError(f"curriculum.values needs len(milestones) + 1 = {len(m) + 1} entries, got {len(vals)}")
    if any(not isinstance(x, (int, float)) or not 0 <= x <= 1 for x in list(m) + list(vals)):
        raise ConfigError("curriculum.milestones and curriculum.values must be numbers in [0, 1]")
    if list(m) != sorted(m):
        raise ConfigError(f"curriculum.milestones must be increasing, got {m}")
    if c.warmstart.max_operands != 0 and c.warmstart.max_operands < 2:
        raise ConfigError(f"warmstart.max_operands = {c.warmstart.max_operands}: use 0 (as data.max_operands) or >= 2")
    if c.optim.share_prefix and not c.optim.packing:
        raise ConfigError("optim.share_prefix = true needs optim.packing = true (the shared prompt lives in the packed "
                          "layout); pass --optim.share_prefix false as well for the padded layout")
    if c.data.modulus == 1:
        raise ConfigError("data.modulus = 1 makes every answer 0; use 0 (plain integers) or >= 2")
    if c.data.min_operands < 2 or c.data.max_operands < c.data.min_operands:
        raise ConfigError(f"data.min_operands/max_operands = {c.data.min_operands}/{c.data.max_operands}: "
                          "need 2 <= min_operands <= max_operands")
    for name, w in c.rewards.custom.items():
        if not isinstance(name, str) or ":" not in name:
            raise ConfigError(f"rewards.custom key {name!r} must be 'module:function'")
        if not isinstance(w, (int, float)) or isinstance(w, bool):
            raise ConfigError(f"rewards.custom[{name!r}] weight must be a number, got {w!r}")


def save(cfg: RTPOConfig, path: str) -> None:
    """config.json, replaced atomically; a failed write (a full disk) raises OSError naming it."""
    from rtpo.checkpoint import write_json

    write_json(path, cfg.to_dict())
