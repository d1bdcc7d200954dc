"""metrics.jsonl (one JSON object per step) and the end-of-run plot."""

from __future__ import annotations

import json
import math
import os


class MetricsLog:
    """Appends one row per step. On resume, rows after the resumed step are dropped first, so a
    resumed run's file equals an uninterrupted run's."""

    def __init__(self, path: str, resume_step=None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            kept = [r for r in read_metrics(path) if r.get("step", -1) < resume_step]
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, path)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


PLOT_KEYS = [("reward", "reward"), ("accuracy", "train accuracy"), ("keep", "keep ratio"),
             ("reasoning_tokens", "generated reasoning tokens"), ("eval/accuracy", "held-out accuracy (no hint)"),
             ("completion_tokens", "completion tokens")]


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
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
