"""Reasoning datasets: rows of question / reasoning / answer.

Sources: the embedded synthetic task, local JSON / JSONL / CSV / Parquet files, or a hub dataset
(through `datasets`). Field names are configurable; `format: gsm8k` splits GSM8K's
"reasoning #### answer" field. Every row is validated; an error names the row index and the field.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass, field

from rtpo import shapes, synthetic, wordproblems
from rtpo.config import DataConfig
from rtpo.vision import ImageError, image_digest, image_field, load_images


class DataError(ValueError):
    """A dataset row or source is unusable; the message names the row/field and the fix."""


@dataclass(frozen=True)
class Example:
    question: str
    reasoning: str
    answer: str
    index: int  # row index in its source split, for error messages and logs
    # every column of the raw row by name (question / reasoning / answer included, as they were in
    # the source): reward functions receive them as keyword arguments (rtpo/rewards.py)
    columns: dict = field(default_factory=dict, compare=False, repr=False)
    images: tuple = field(default=(), compare=False, repr=False)  # decoded RGB PIL images (data.image_field)
    image_digest: str = ""  # hash of the pixels ("" without images): rows asking the same question differ by it

    @property
    def identity(self) -> tuple:
        """What makes two rows the same example: the question and, for image rows, the pixels."""
        return self.question, self.image_digest


# Datasets generated in code, by data.dataset name: each module has make_dataset(size, seed,
# min_operands, max_operands, max_operand) and disjoint TRAIN_SEED / EVAL_SEED / VALIDATION_SEED /
# WARMSTART_SEED.
GENERATED = {"embedded": synthetic, "wordproblems": wordproblems, "shapes": shapes}
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# GSM8K calculator annotations such as "<<48/2=24>>" are not reasoning text.
_CALC = re.compile(r"<<[^>]*>>")


def split_gsm8k(text: str) -> tuple[str, str]:
    """GSM8K answers read "reasoning lines\\n#### 72": return (reasoning, "72")."""
    if "####" not in text:
        raise ValueError("no '####' separator")
    reasoning, _, answer = text.rpartition("####")
    return _CALC.sub("", reasoning).strip(), answer.strip().replace(",", "")


def validate_rows(rows, cfg: DataConfig, source: str) -> list[Example]:
    """Map raw rows to Examples. Missing field, empty question, non-string reasoning or a missing
    answer raise DataError naming the row and field; empty reasoning is allowed (no hint)."""
    fmt = cfg.format
    qf, rf, af = cfg.question_field, cfg.reasoning_field, cfg.answer_field
    if fmt == "auto":
        first = rows[0] if len(rows) else {}
        fmt = "gsm8k" if rf not in first and af in first and "####" in str(first.get(af, "")) else "fields"
    imf = image_field(cfg.image_field, rows[0] if len(rows) and isinstance(rows[0], dict) else {})
    # relative image paths are looked up next to a local dataset file first
    base_dir = os.path.dirname(os.path.abspath(cfg.dataset)) if os.path.isfile(cfg.dataset) else None
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {i} is a {type(row).__name__}, expected an object with fields")
        if imf is not None and imf not in row:
            have = ", ".join(map(str, row.keys()))
            raise DataError(f"{source}: row {i} has no field {imf!r} (data.image_field); fields present: {have}. "
                            "Set --data.image_field to the image column, or none for text-only rows")
        for name, key in [("question_field", qf), ("answer_field", af)] + ([("reasoning_field", rf)] if fmt == "fields" else []):
            if key not in row:
                have = ", ".join(map(str, row.keys()))
                raise DataError(f"{source}: row {i} has no field {key!r} (data.{name}); fields present: {have}. "
                                f"Set --data.{name} to the right column")
        q = row[qf]
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{source}: row {i} field {qf!r} (question) is empty or not text: {q!r}")
        if fmt == "gsm8k":
            a = row[af]
            if not isinstance(a, str):
                raise DataError(f"{source}: row {i} field {af!r} must be text 'reasoning #### answer', got {type(a).__name__}")
            try:
                reasoning, answer = split_gsm8k(a)
            except ValueError:
                raise DataError(f"{source}: row {i} field {af!r} has no '#### answer' part (data.format=gsm8k); "
                                "use --data.format fields with separate reasoning/answer columns") from None
        else:
            reasoning, answer = row[rf], row[af]
            if reasoning is None:
                reasoning = ""
            if not isinstance(reasoning, str):
                raise DataError(f"{source}: row {i} field {rf!r} (reasoning) must be text, got {type(reasoning).__name__}")
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = str(answer)
            if not isinstance(answer, str):
                raise DataError(f"{source}: row {i} field {af!r} (answer) must be text or a number, got {type(answer).__name__}")
        if not answer.strip():
            raise DataError(f"{source}: row {i} field {af!r} (answer) is empty; every row needs an answer to reward")
        try:
            images = load_images(row[imf], base_dir) if imf is not None else ()
        except ImageError as e:
            raise DataError(f"{source}: row {i} field {imf!r} (data.image_field): {e}; fix or remove the row, or "
                            "set --data.image_field none to train without images") from None
        out.append(Example(q.strip(), reasoning.strip(), answer.strip(), i, columns=dict(row), images=images,
                           image_digest=image_digest(images)))
    return out


def _load_local(path: str, split: str):
    import datasets

    ext = os.path.splitext(path)[1].lower()
    if ext not in LOCAL_FORMATS:
        raise DataError(f"data.dataset {path!r}: unsupported file type {ext!r}; use one of {', '.join(LOCAL_FORMATS)}")
    if ext != ".parquet":
        _check_utf8(path)
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if not head.strip():
        raise DataError(f"data.dataset {path!r} is empty: it has no rows")
    try:
        with _datasets_quiet():  # it logs its own traceback; the DataError below is the one report
            ds = datasets.load_dataset(LOCAL_FORMATS[ext], data_files={split: path}, split=split)
    except Exception as e:  # datasets raises many types for unreadable files
        why = (_json_problem(path) if LOCAL_FORMATS[ext] == "json" else None) or _root_cause(e)
        raise DataError(f"data.dataset {path!r} could not be read as {LOCAL_FORMATS[ext]}: {why}") from None
    return ds.to_list()


def _check_utf8(path: str) -> None:
    """The whole text file is UTF-8, read line by line (streamed: memory stays one line). A bad byte
    anywhere raises DataError naming the line and the byte offset in the file."""
    offset = 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"data.dataset {path!r} is not UTF-8 text: line {n} ({e.reason} at byte "
                                f"{offset + e.start} of the file); re-encode it as UTF-8, or fix or remove that "
                                "line") from None
            offset += len(line)


@contextlib.contextmanager
def _datasets_quiet():
    """No datasets log records or progress bars while loading a local file; restored afterwards."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from datasets.utils import logging as ds_logging

    level, bars_off = ds_logging.get_verbosity(), are_progress_bars_disabled()
    ds_logging.set_verbosity(logging.CRITICAL + 1)
    disable_progress_bars()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if not bars_off:
            enable_progress_bars()


def _json_problem(path: str):
    """The first line of a JSON / JSON-lines file that does not parse, as 'line N: reason', or None."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        json.loads(text)
        return None  # one JSON document: the problem is elsewhere
    except json.JSONDecodeError:
        pass
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n}: {e.msg} (column {e.colno}); fix or remove that line"
    return None


def _root_cause(e: BaseException) -> str:
    """The innermost exception of a chain, on one line (datasets wraps the parser's error)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return " ".join(f"{type(e).__name__}: {e}".split())


def _load_hub(name: str, subset, split: str):
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        raise DataError(f"data.dataset {name!r} (subset {subset!r}, split {split!r}) could not be loaded: "
                        f"{type(e).__name__}: {e}. Offline? Use a local file or the embedded dataset") from None
    return ds.to_list()


def generate_rows(cfg: DataConfig, split: str, size: int, max_operands: int = 0) -> list:
    """Rows of a generated dataset's split (train / test / warmstart: disjoint seeds)."""
    gen = GENERATED[cfg.dataset]
    seed = {"train": gen.TRAIN_SEED, "test": gen.EVAL_SEED, "validation": gen.VALIDATION_SEED,
            "warmstart": gen.WARMSTART_SEED}[split]
    hi = max_operands or cfg.max_operands
    extra = {"modulus": cfg.modulus} if gen is synthetic else {}
    return gen.make_dataset(size, seed, min_operands=min(cfg.min_operands, hi), max_operands=hi,
                            max_operand=cfg.max_operand, **extra)


def load_rows(cfg: DataConfig, split: str):
    if cfg.dataset in GENERATED:
        held_out = split in ("test", "validation")
        return generate_rows(cfg, split, max(cfg.num_eval, 1) if held_out else cfg.synthetic_size)
    if os.path.exists(cfg.dataset):
        return _load_local(cfg.dataset, split)
    if cfg.dataset.endswith(tuple(LOCAL_FORMATS)):
        raise DataError(f"data.dataset {cfg.dataset!r}: no such file")
    return _load_hub(cfg.dataset, cfg.subset, split)


def load_splits(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    """Return (train, eval). Without an eval split, the last `num_eval` rows are held out.
    Eval questions are removed from train so that held-out accuracy is honest."""
    source = cfg.dataset
    rows = load_rows(cfg, cfg.split)
    if len(rows) == 0:
        raise DataError(f"data.dataset {source!r} split {cfg.split!r} has no rows")
    train = validate_rows(rows, cfg, f"{source}[{cfg.split}]")
    if cfg.dataset in GENERATED:  # held out: "test" (default, for reporting) or "validation" (for tuning)
        name = cfg.eval_split or "test"
        if name not in ("test", "validation"):
            raise DataError(f"data.eval_split {name!r}: the generated dataset {source!r} has the held-out splits "
                            "'test' (the default, for reporting) and 'validation' (for tuning)")
        ev = validate_rows(load_rows(cfg, name), cfg, f"{source}[{name}]")
    elif cfg.eval_split:
        ev = validate_rows(load_rows(cfg, cfg.eval_split), cfg, f"{source}[{cfg.eval_split}]")
    else:
        if len(train) <= cfg.num_eval:
            raise DataError(f"data.dataset {source!r} has {len(train)} rows, not more than data.num_eval = {cfg.num_eval}; "
                            "lower --data.num_eval or give --data.eval_split")
        train, ev = train[:-cfg.num_eval] if cfg.num_eval else train, train[-cfg.num_eval:] if cfg.num_eval else []
    ev = ev[: cfg.num_eval]
    held = {e.identity for e in ev}
    train = [e for e in train if e.identity not in held]
    if cfg.num_train:
        train = train[: cfg.num_train]
    if not train:
        raise DataError(f"data.dataset {source!r}: no training rows left after holding out the eval rows")
    return train, ev


def warmstart_rows(cfg: DataConfig, exclude: set, num: int, max_operands: int = 0) -> list[Example]:
    """Rows for the supervised warm-start, disjoint from the RL train and eval examples (`exclude`: their
    Example.identity): the generated task's own warm-start split (at most `max_operands` numbers per
    question when > 0)."""
    if cfg.dataset not in GENERATED:
        raise DataError(f"warmstart.enabled needs a generated dataset ({', '.join(GENERATED)}) or a model that "
                        "already knows the format; set --warmstart.enabled false")
    rows = generate_rows(cfg, "warmstart", num, max_operands)
    return [e for e in validate_rows(rows, cfg, f"{cfg.dataset}[warmstart]") if e.identity not in exclude]
