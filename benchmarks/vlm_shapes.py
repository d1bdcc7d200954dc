"""Vision-language RTPO on CPU: the tiny Qwen2-VL (`--model embedded-vl`) on the shapes task, no-hint accuracy
before and after a short run, RTPO (`--preset shapes`: cosine hint schedule + hint loss) vs GRPO (no hint,
no hint loss) from the same warm-started model, paired by seed.

    python benchmarks/vlm_shapes.py [--seeds 1,2,3] [--arms rtpo,grpo] [--key value ...]

Extra `--key value` flags are config overrides on top of `--preset shapes` (e.g. `--run.max_steps 60`).
The warm-start is trained once (cached in .cache/rtpo) and shared by every run. Prints a table and writes
JSON to benchmarks/results/vlm_shapes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rtpo.checkpoint import write_json  # noqa: E402
from rtpo.cli import parse_args  # noqa: E402
from rtpo.trainer import Trainer  # noqa: E402

ARMS = {"rtpo": [], "grpo": ["--curriculum.schedule", "none", "--loss.hint_loss", "0"]}


def run_arm(arm: str, seed: int, overrides: list, log) -> dict:
    out = tempfile.mkdtemp(prefix=f"vlm_shapes-{arm}-{seed}-")
    try:
        cfg = parse_args(["--preset", "shapes", *ARMS[arm], "--run.seed", str(seed), "--run.output_dir", out,
                          "--log.plot", "false", "--log.progress", "false", *overrides])
        t0 = time.perf_counter()
        summary = Trainer(cfg, log=log).train()
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    curve = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    return {"arm": arm, "seed": seed, "seconds": time.perf_counter() - t0, "steps": summary["steps"],
            "before": summary["eval_before"], "after": summary["eval_after"], "eval_curve": curve,
            "train_reward_first5": statistics.mean(r["reward"] for r in rows if "reward" in r and r["step"] < 5)}


def table(results: list) -> str:
    lines = ["| arm | seed | no-hint accuracy before | after | reasoning tokens before | after | eval curve (step: acc) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        b, a = r["before"], r["after"]
        curve = ", ".join(f"{s}: {x:.2f}" for s, x in r["eval_curve"])
        lines.append(f"| {r['arm']} | {r['seed']} | {b['eval/accuracy']:.3f} | {a['eval/accuracy']:.3f} | "
                     f"{b['eval/reasoning_tokens']:.1f} | {a['eval/reasoning_tokens']:.1f} | {curve} |")
    for arm in dict.fromkeys(r["arm"] for r in results):
        after = [r["after"]["eval/accuracy"] for r in results if r["arm"] == arm]
        lines.append(f"| {arm} mean | | | {statistics.mean(after):.3f} | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--arms", default="rtpo,grpo")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "vlm_shapes.json"))
    args, overrides = ap.parse_known_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    arms = [a for a in args.arms.split(",") if a]
    log = lambda m: print(m, flush=True) if m.startswith(("[warmstart]", "[rtpo] held-out")) else None  # noqa: E731
    results = [run_arm(arm, seed, overrides, log) for seed in seeds for arm in arms]
    print(table(results))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, {"results": results, "overrides": overrides, "python": platform.python_version(),
                          "machine": platform.machine(), "cpus": os.cpu_count()})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
