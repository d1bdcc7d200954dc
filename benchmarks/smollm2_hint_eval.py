"""How much does the injected hint help SmolLM2-135M, and what does a short RTPO run change?

Greedy accuracy on held-out word problems (rtpo/wordproblems.py) with the reasoning trace injected at
keep = 1 (whole trace, which ends by stating the answer), 0.5 (first half of its tokens) and 0 (no
hint: the evaluation prompt), before and after an RTPO run of `--steps` steps with the `smollm2`
preset. Accuracy is scored as in training: on the injected hint + the completion, the answer after
`</think>` if the response has one, else the stated/last number. The evaluation is rtpo.eval's
(`evaluate_keeps`); without the training part, the same table is one command each:

    python -m rtpo.eval smollm2-135m --preset smollm2 --keep 1,0.5,0 --num-examples 64     # before RL
    python -m rtpo.eval runs/smollm2 --keep 1,0.5,0 --num-examples 64   # after train.py --preset smollm2 --output_dir runs/smollm2

    python benchmarks/smollm2_hint_eval.py [--steps 24] [--num-eval 64] [--key value ...]

Extra `--key value` flags are config overrides on top of `--preset smollm2` (e.g. `--lr 2e-5`).
Prints a table and writes JSON (with sample outputs) to benchmarks/results/smollm2_hint_eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rtpo.cli import parse_args  # noqa: E402
from rtpo.checkpoint import write_json  # noqa: E402
from rtpo.eval import evaluate_keeps  # noqa: E402
from rtpo.trainer import Trainer  # noqa: E402

KEEPS = (1.0, 0.5, 0.0)


def evaluate_all(tr, n, log):
    """rtpo.eval at keep 1 / 0.5 / 0 on the first n held-out rows, keyed by str(keep)."""
    return {str(r["keep"]): r for r in evaluate_keeps(tr.run, KEEPS, n, progress=False, samples=3, log=log)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24, help="RTPO steps between the two evaluations (0: only before)")
    ap.add_argument("--num-eval", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "smollm2_hint_eval.json"))
    args, overrides = ap.parse_known_args(argv)
    run_dir = tempfile.mkdtemp(prefix="smollm2_hint_eval-")
    # The trainer's own evaluations are switched off (eval.num_examples 0): this script evaluates.
    cfg = parse_args(["--preset", "smollm2", "--run.max_steps", str(max(args.steps, 1)), "--data.num_eval",
                      str(args.num_eval), "--eval.num_examples", "0", "--log.plot", "false", "--log.progress", "false", "--checkpoint.every", "0",
                      "--run.output_dir", run_dir, "--run.overwrite", "true"] + overrides)
    log = print
    t0 = time.perf_counter()
    tr = Trainer(cfg)
    log(f"[bench] setup {time.perf_counter() - t0:.1f} s; {len(tr.run.train_rows)} train / {len(tr.run.eval_rows)} eval rows; "
        f"torch threads {torch.get_num_threads()}")
    result = {"config": cfg.to_dict(), "steps": args.steps, "num_eval": min(args.num_eval, len(tr.run.eval_rows)),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "device": str(tr.run.device),
                          # other jobs on a shared CPU slow every timing here: the 1-minute load at start/end
                          "load_start": os.getloadavg()[0]}}
    log("[bench] before RL")
    result["before"] = evaluate_all(tr, args.num_eval, log)
    if args.steps:
        t1 = time.perf_counter()
        summary = tr.train()
        result["train_seconds"] = time.perf_counter() - t1
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
        result["train_metrics"] = [{k: r.get(k) for k in ("step", "keep", "reward", "accuracy", "completion_tokens",
                                                            "loss", "grad_norm", "time_step")} for r in rows if "keep" in r]
        result["skipped_updates"] = summary.get("skipped_updates")
        log(f"[bench] {args.steps} RTPO steps in {result['train_seconds']:.0f} s")
        log("[bench] after RL")
        result["after"] = evaluate_all(tr, args.num_eval, log)
    shutil.rmtree(run_dir, ignore_errors=True)
    result["machine"]["load_end"] = os.getloadavg()[0]

    n = result["num_eval"]
    log(f"\nSmolLM2-135M-Instruct, {n} held-out word problems, greedy; accuracy (correct/{n})")
    cols = ["before RL"] + ([f"after {args.steps} steps"] if args.steps else [])
    log("| hint (keep) | " + " | ".join(cols) + " |")
    log("|---|" + "---|" * len(cols))
    for keep in KEEPS:
        cells = [f"{result[w][str(keep)]['accuracy']:.3f} ({result[w][str(keep)]['correct']})"
                 for w in (["before", "after"] if args.steps else ["before"])]
        log(f"| {keep:g} | " + " | ".join(cells) + " |")
    if args.steps:
        log(f"RL: {args.steps} steps, {result['train_seconds']:.0f} s wall ({result['train_seconds'] / args.steps:.1f} s/step)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_json(args.out, result)
    log(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
