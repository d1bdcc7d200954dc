"""metrics.jsonl (one JSON object per step, the source of truth), samples.jsonl, the end-of-run
plot, and optional mirrors of the metrics to TensorBoard or Weights & Biases (`log.report_to`)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np

from rtpo.checkpoint import crash_point, replace_file


class NoLog:
    """Where a process that does not write the run folder logs: nowhere."""

    def write(self, row: dict) -> None:
        pass

    def write_many(self, rows: list) -> None:
        pass


class MetricsLog:
    """Appends one row per step. On resume, rows after the resumed step are dropped first, so a
    resumed run's file equals an uninterrupted run's. Every row ends in a newline: a last line
    without one was cut short (a full disk) and is dropped on resume."""

    def __init__(self, path: str, resume_step=None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            kept = [r for r in _complete_rows(path) if r.get("step", -1) < resume_step]

            def write(tmp):
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)

            replace_file(path, write)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, row: dict) -> None:
        self.write_many([row])

    def write_many(self, rows: list) -> None:
        """Append rows (non-finite floats become null) with one fsync."""
        if not rows:
            return
        text = "".join(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in row.items()}, default=str) + "\n" for row in rows)
        name = os.path.basename(self.path)
        crash_point(f"{name}: before append")
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)  # one write call; a tail cut short by a kill or a full disk is dropped on resume
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            e.filename = e.filename or self.path  # a failed write() names no file: say which
            raise
        crash_point(f"{name}: appended")


def _complete_rows(path: str) -> list[dict]:
    """The rows of a metrics file; text after its last newline is a row cut short, not a row."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]


# ----------------------------------------------------------------------------- report_to

# The pip command that provides each log.report_to backend (the extras are in setup.cfg).
REPORT_TO_PACKAGES = {"tensorboard": ("tensorboard", 'pip install -e ".[tensorboard]"'),
                      "wandb": ("wandb", 'pip install -e ".[wandb]"')}


def report_to_problem(kind: str):
    """None if the backend of log.report_to = kind can be used, else a one-line reason with the fix."""
    if kind not in REPORT_TO_PACKAGES:
        return None
    module, cmd = REPORT_TO_PACKAGES[kind]
    if importlib.util.find_spec(module) is None:
        return f"log.report_to = {kind} needs the {module} package: {cmd} (or --log.report_to none)"
    return None


def _scalars(row: dict) -> dict:
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class NoReporter:
    def log(self, row: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReporter(NoReporter):
    """Scalars of each metrics row under their metrics.jsonl names in <run>/tensorboard/. On resume,
    events at or after the resumed step are purged, as metrics.jsonl's rows are."""

    def __init__(self, log_dir: str, resume_step=None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir, purge_step=resume_step)

    def log(self, row: dict, step: int) -> None:
        for k, v in _scalars(row).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter(NoReporter):
    """One W&B run per output folder: its id is kept in <run>/wandb_id so that a resumed run
    continues the same W&B run. Settings beyond the project come from WANDB_* variables
    (WANDB_MODE=offline works without a network)."""

    def __init__(self, run_dir: str, project: str, config: dict):
        import wandb

        id_path = os.path.join(run_dir, "wandb_id")
        if os.path.exists(id_path):
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip()
        else:
            run_id = wandb.util.generate_id()
            with open(id_path, "w", encoding="utf-8") as f:
                f.write(run_id)
        self.run = wandb.init(project=project, name=os.path.basename(os.path.abspath(run_dir)), id=run_id,
                              resume="allow", dir=run_dir, config=config)

    def log(self, row: dict, step: int) -> None:
        self.run.log(_scalars(row), step=step)

    def close(self) -> None:
        self.run.finish()


def make_reporter(kind: str, run_dir: str, *, project: str = "rtpo", config=None, resume_step=None):
    """The log.report_to backend for a run writing to run_dir (NoReporter for "none")."""
    problem = report_to_problem(kind)
    if problem:
        raise ImportError(problem)
    if kind == "tensorboard":
        return TensorBoardReporter(os.path.join(run_dir, "tensorboard"), resume_step=resume_step)
    if kind == "wandb":
        return WandbReporter(run_dir, project, config or {})
    return NoReporter()


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


PLOT_KEYS = [("eval/accuracy", "held-out accuracy (no hint)"), ("accuracy", "train accuracy"),
             ("keep", "keep ratio"), ("reasoning_tokens", "generated reasoning tokens"),
             ("all_wrong_groups", "all-wrong groups"), ("reward", "reward")]


def plot_metrics(metrics_path: str, out_path: str) -> str | None:
    """A PNG of the main curves; None (and a log line by the caller) if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, PLOT_KEYS):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key.startswith("eval/") else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    replace_file(out_path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))  # never a half-written PNG
    plt.close(fig)
    return out_path


TABLE_ROWS = (("eval/accuracy", "accuracy", "{:.3f}"), ("eval/format", "format", "{:.3f}"),
              ("eval/reasoning_tokens", "reasoning tokens", "{:.1f}"),
              ("eval/completion_tokens", "completion tokens", "{:.1f}"))


def before_after_table(before: dict, after: dict, title: str) -> str:
    """A few lines comparing two held-out evaluations (the `eval/...` keys present in both)."""
    lines = [f"{title:<28}{'before':>9}{'after':>9}"]
    for key, name, f in TABLE_ROWS:
        if key in before and key in after:
            lines.append(f"  {name:<26}{f.format(before[key]):>9}{f.format(after[key]):>9}")
    return "\n".join(lines)


# How each metric of a step combines over processes, declared where the metric is defined
# (`reduce_as` in rtpo/trainer.py): "same" (computed from gathered values: already global), "sum"
# (each process holds a share), "max", "tokens" (a per-token mean, weighted by each process's
# completion tokens) or "mean" (a per-row mean; every process holds as many rows). Undeclared:
# time_* take the max, reward/* are global, anything else is a per-row mean.
REDUCE: dict = {}


def reduce_as(how: str, *names: str) -> None:
    if how not in ("same", "sum", "max", "tokens", "mean"):
        raise ValueError(f"unknown reduction {how!r}")
    REDUCE.update(dict.fromkeys(names, how))


def _reduction(key: str) -> str:
    return REDUCE.get(key) or ("max" if key.startswith("time_") else "same" if key.startswith("reward/") else "mean")


def reduce_rows(rows: list) -> dict:
    """One metrics row from each process's row (same keys); unknown numeric keys are averaged, which
    is exact for per-row means since every process holds the same number of rows."""
    weights = [float(r.get("completion_tokens") or 0.0) for r in rows]
    out = {}
    for k, v0 in rows[0].items():
        vals, how = [r.get(k) for r in rows], _reduction(k)
        if how == "same" or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = v0
        elif how == "sum":
            out[k] = float(sum(vals))
        elif how == "max":
            out[k] = max(vals)
        elif how == "tokens" and sum(weights) > 0:
            out[k] = float(sum(w * v for w, v in zip(weights, vals)) / sum(weights))
        else:
            out[k] = float(np.mean(vals))
    return out


class Samples:
    """samples.jsonl rows: every completion of the last scored rollout's first `groups` groups (prompt, hint
    fraction, completion, reward per function, advantage), then the last evaluation's records (once)."""

    def __init__(self, groups: int):
        self.groups, self.train, self.eval = groups, [], []

    def observe(self, ro, sc) -> None:
        """The step's rollout and its scores (this process's rows)."""
        G, out = ro.G, []
        keeps, injected = ro.row_keep, ro.injected
        for r in range(min(self.groups * G, len(ro.completions))):
            out.append({"group": r // G, "example": ro.examples[r // G].index, "prompt": sc.prompt_texts[r],
                        "keep": float(keeps[r]), "injected_tokens": injected[r], "completion": sc.texts[r],
                        "answer": ro.examples[r // G].answer, "reward": float(sc.rewards[r]),
                        "rewards": {k: v[r] for k, v in sc.per_fn.items()}, "advantage": float(sc.advantages[r]),
                        "finish_reason": ro.finish_reasons[r], "completion_tokens": len(ro.completions[r])})
        self.train = out

    def observe_eval(self, records: list) -> None:
        self.eval = records

    def take(self, step: int, train: bool = True) -> list:
        """The rows to write at `step`; the evaluation's records are written once."""
        out = [{"step": step, "split": "train", **rec} for rec in self.train] if train else []
        out += [{"step": step, "split": "eval", **rec} for rec in self.eval]
        self.eval = []
        return out
