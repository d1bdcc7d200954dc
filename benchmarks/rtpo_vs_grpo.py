"""Does the method work? RTPO against plain GRPO, equal budgets, several seeds, paired by seed.

Regimes (`--regime`): `hard` (default; `--preset hard`, where plain GRPO starves at first: most groups
are all wrong), `starved` (the same with a warm-start that never starts reasoning on its own) and
`default` (the project defaults, `python train.py`'s task).

Arms (`--arms`, default the first four):

  grpo              curriculum.schedule none       no hint at any step (plain GRPO)
  rtpo_cosine       curriculum.schedule cosine     full trace at step 0, cut (cosine) to none
  rtpo_per_example  cosine + per_example + hint_dropout 0.25
                                                   each example's hint follows its own groups (longer
                                                   after all-wrong, shorter after success), capped by
                                                   the cosine; a quarter of every group has no hint
  rtpo_hint_loss    cosine + loss.hint_loss 1      plus a log-likelihood loss on the injected hint (UFT)
  rtpo_linear       curriculum.schedule linear
  rtpo_adaptive     curriculum.schedule adaptive   keep falls while batch accuracy >= target

Equal budget: the same number of steps, prompts per step and G (so the same number of sampled
completions and optimizer updates), the same warm-started model (warmstart.seed is fixed), and per
seed the same prompt order and sampling seed in every arm (so arms are paired by seed). RTPO prompts
hold the hint, so its steps cost a little more compute: the wall time is reported.

Measured: held-out accuracy with NO hint (greedy, every `--eval-every` steps), the all-wrong group
fraction, training reward and accuracy, generated reasoning tokens (training rollouts, and held-out
without hint), keep. One PNG of the curves (mean over seeds, band = +-1 std), a JSON with every run's
per-step metrics, and a table printed last: mean +- std over seeds and the paired difference to GRPO
with its 95 % t-interval.

  python benchmarks/rtpo_vs_grpo.py                 # hard regime, 4 arms x 3 seeds
  python benchmarks/rtpo_vs_grpo.py --quick         # 24 steps x 4 arms x 2 seeds, smaller eval
  python benchmarks/rtpo_vs_grpo.py --regime default --arms grpo,rtpo_cosine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARMS = {
    # --- no hint in any prompt ---
    "grpo": ["--curriculum.schedule", "none"],
    "grpo_sft": ["--curriculum.schedule", "none", "--loss.sft_loss", "1.0"],
    "grpo_sft_decay": ["--curriculum.schedule", "none", "--loss.sft_loss", "1.0", "--loss.sft_decay", "linear"],
    "sft_then_grpo": ["--curriculum.schedule", "none"],  # + --sft.steps matched to rtpo_hint_loss (sft_steps)
    # --- hints in the prompt ---
    "rtpo_cosine": ["--curriculum.schedule", "cosine"],
    "rtpo_per_example": ["--curriculum.schedule", "cosine", "--curriculum.per_example", "true",
                         "--curriculum.hint_dropout", "0.25"],
    "rtpo_hint_loss": ["--curriculum.schedule", "cosine", "--loss.hint_loss", "1.0"],
    "rtpo_on_demand": ["--curriculum.schedule", "constant", "--curriculum.value", "1", "--curriculum.per_example",
                       "true", "--curriculum.per_example_start", "0"],
    "rtpo_prefix_rft": ["--curriculum.schedule", "cosine", "--curriculum.hint_dropout", "0.5",
                        "--loss.hint_advantage", "true", "--loss.hint_top_entropy", "0.2"],
    # round 4, post hoc (the within-step form of hints on demand; DAPO's dynamic sampling as a non-hint baseline)
    "grpo_dynamic": ["--curriculum.schedule", "none", "--rollout.dynamic_sampling", "3"],
    "rtpo_reroll": ["--curriculum.schedule", "none", "--curriculum.reroll_keep", "0.5"],
    "rtpo_reroll_hint_loss": ["--curriculum.schedule", "none", "--curriculum.reroll_keep", "0.5", "--loss.hint_loss",
                              "1.0"],
    "rtpo_linear": ["--curriculum.schedule", "linear"],
    "rtpo_adaptive": ["--curriculum.schedule", "adaptive"],
}
NON_HINT = ("grpo", "grpo_sft", "grpo_sft_decay", "sft_then_grpo", "grpo_dynamic")
DEFAULT_ARMS = ["grpo", "grpo_sft", "grpo_sft_decay", "sft_then_grpo", "rtpo_cosine", "rtpo_hint_loss",
                "rtpo_on_demand", "rtpo_prefix_rft"]
REGIMES = {"hard": ["--preset", "hard"], "default": [],
           # the warm-start's last third never shows a trace: the model does not start reasoning on its own
           "starved": ["--preset", "hard", "--warmstart.reasoning_fraction", "0"],
           # round 3's untuned variant, fixed before its first run: another modulus, longer chains, another mix
           "variant": ["--data.modulus", "7", "--data.min_operands", "4", "--data.max_operands", "6",
                       "--warmstart.reasoning_fraction", "0.1"]}
STEP_KEYS = ("step", "keep", "mean_example_keep", "injected_tokens", "reward", "accuracy", "reasoning_tokens",
             "completion_tokens", "zero_var_groups", "all_wrong_groups", "all_right_groups", "hint_nll", "sft_nll",
             "clip_frac", "entropy", "grad_norm", "fwd_tokens", "sup_tokens", "time_step", "rollouts", "refill_rounds",
             "rerolled_groups")
EVAL_KEYS = ("eval/accuracy", "eval/format", "eval/reasoning_tokens", "eval/completion_tokens")
FULL = {"steps": None, "seeds": "1,2,3", "eval_examples": 256, "eval_every": 20}   # None: the regime's default
QUICK = {"steps": 24, "seeds": "1,2", "eval_examples": 128, "eval_every": 12}


def trainer_argv(arm: str, seed: int, out: str, args, sft_steps: int = 0) -> list:
    """The run's overrides on top of the project defaults. More held-out rows than data.num_eval
    change the held-out set, hence the warm-start's rows: one more warm-start is built (and cached)."""
    from rtpo.cli import parse_args

    argv = REGIMES[args.regime] + ["--run.output_dir", out, "--run.overwrite", "true", "--run.seed", str(seed),
            "--log.progress", "false", "--log.plot", "false", "--checkpoint.every", "0",
            "--eval.num_examples", str(args.eval_examples), "--eval.every", str(args.eval_every),
            "--loss.hint_loss", "0"]  # the arms name the hint loss where they use it (the project default is 1)
    if args.eval_examples > parse_args(REGIMES[args.regime]).data.num_eval:  # hold out more rows; fewer: the first ones
        argv += ["--data.num_eval", str(args.eval_examples)]
    if args.steps:
        argv += ["--run.max_steps", str(args.steps)]
    if args.lr is not None:
        argv += ["--optim.lr", str(args.lr)]
    for kv in args.set:
        key, sep, val = kv.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {kv!r}")
        argv += [f"--{key}", val]
    extra = ["--sft.steps", str(sft_steps)] if arm == "sft_then_grpo" else []
    return argv + ARMS[arm] + extra


def matched_sft_steps(hint_run: dict, sft_run: dict) -> int:
    """sft_then_grpo's supervised steps: as many trace tokens as rtpo_hint_loss put through its hint loss
    over its run (sum of sup_tokens), in steps of one rollout batch of whole responses (grpo_sft's
    sup_tokens per step: the same prompts_per_step examples' whole responses)."""
    hint_total = sum(s.get("sup_tokens") or 0 for s in hint_run["steps"])
    per_step = statistics.mean(s["sup_tokens"] for s in sft_run["steps"] if s.get("sup_tokens"))
    return max(1, round(hint_total / per_step))


def run_arm(arm: str, seed: int, args, workdir: str, log=None, sft_steps: int = 0) -> dict:
    """Train one arm for one seed; returns its per-step and eval rows and wall time."""
    from rtpo.cli import parse_args
    from rtpo.metrics import read_metrics
    from rtpo.trainer import Trainer

    out = os.path.join(workdir, f"{arm}_seed{seed}")
    cfg = parse_args(trainer_argv(arm, seed, out, args, sft_steps=sft_steps))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, log=log or (lambda m: print(m, flush=True) if m.startswith("[warmstart]") else None))
    summary = trainer.train()
    wall = time.perf_counter() - t0
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    if not getattr(args, "keep_checkpoints", False):  # the final checkpoint: ~9 MB a run, not needed here
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    steps = [{k: _round(r.get(k)) for k in STEP_KEYS} for r in rows if "reward" in r]
    evals = [{"step": r["step"], **{k: _round(r[k]) for k in EVAL_KEYS if k in r}} for r in rows
             if "eval/accuracy" in r]
    return {"arm": arm, "seed": seed, "wall_s": wall, "train_s": summary["wall_seconds"], "steps": steps,
            "evals": evals, "skipped_updates": summary.get("skipped_updates", 0), "config": cfg.to_dict(),
            "sft_steps": sft_steps, "sft_tokens": summary.get("sft_tokens", 0),
            "fwd_tokens": sum(s.get("fwd_tokens") or 0 for s in steps) + summary.get("sft_tokens", 0)}


def _run_job(job):
    """A worker process's job (benchmarks run --jobs N arms side by side, one torch thread each)."""
    arm, seed, args, workdir, sft_steps = job
    return run_arm(arm, seed, args, workdir, sft_steps=sft_steps)


def _round(x, digits=6):
    return float(f"{x:.{digits}g}") if isinstance(x, float) else x


# ----------------------------------------------------------------------------- summary

def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _window_mean(steps, key, lo, hi):
    vals = [s[key] for s in steps[lo:hi] if s.get(key) is not None]
    return statistics.mean(vals) if vals else None


# two-sided 95 % quantiles of Student's t by degrees of freedom (a paired difference over n seeds has n - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t_interval(xs: list) -> tuple:
    """(mean, half-width of the 95 % t-interval) of paired differences; half-width None for one value."""
    if len(xs) < 2:
        return statistics.mean(xs), None
    df = len(xs) - 1
    t = T975[max(k for k in T975 if k <= df)]  # rounding df down: a slightly wider, conservative interval
    return statistics.mean(xs), t * statistics.stdev(xs) / len(xs) ** 0.5


def summarize(runs: list, arms: list, first_n: int, per_step: int) -> list:
    """One row per arm: mean +- std over seeds; accuracy differences to GRPO are paired by seed. per_step:
    prompts_per_step x G (the rollouts of a step without refills)."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    rows = []
    for arm in arms:
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]
        n = len(rs[0]["steps"])
        per = {
            "final_acc": [r["evals"][-1]["eval/accuracy"] for r in rs],
            "auc_acc": [statistics.mean(e["eval/accuracy"] for e in r["evals"]) for r in rs],
            "start_acc": [r["evals"][0]["eval/accuracy"] for r in rs],
            "final_eval_reasoning": [r["evals"][-1].get("eval/reasoning_tokens") for r in rs],
            "reward_first": [_window_mean(r["steps"], "reward", 0, first_n) for r in rs],
            "reward_last": [_window_mean(r["steps"], "reward", n - first_n, n) for r in rs],
            "acc_last": [_window_mean(r["steps"], "accuracy", n - first_n, n) for r in rs],
            "reasoning_last": [_window_mean(r["steps"], "reasoning_tokens", n - first_n, n) for r in rs],
            "keep_mean": [_window_mean(r["steps"], "mean_example_keep", 0, n) for r in rs],  # = keep without per-example
            "keep_final": [r["steps"][-1]["keep"] for r in rs],
            "all_wrong_first20": [_window_mean(r["steps"], "all_wrong_groups", 0, 20) for r in rs],
            "all_wrong_last": [_window_mean(r["steps"], "all_wrong_groups", n - first_n, n) for r in rs],
            "wall_s": [r["wall_s"] for r in rs],
            "fwd_tokens": [r.get("fwd_tokens") for r in rs],
            "sup_tokens": [sum(s.get("sup_tokens") or 0 for s in r["steps"]) + (r.get("sft_tokens") or 0) for r in rs],
            "rollouts": [rollouts(r, per_step) for r in rs],
        }
        if arm != "grpo" and all(("grpo", r["seed"]) in by for r in rs):
            per["d_final_acc"] = [r["evals"][-1]["eval/accuracy"] - by[("grpo", r["seed"])]["evals"][-1]["eval/accuracy"]
                                  for r in rs]
        row = {"arm": arm, "seeds": [r["seed"] for r in rs], "per_seed": per}
        for k, v in per.items():
            row[k] = _ms(v)
        if "d_final_acc" in per:
            d_eval_reason = [r["evals"][-1].get("eval/reasoning_tokens", 0) -
                             by[("grpo", r["seed"])]["evals"][-1].get("eval/reasoning_tokens", 0) for r in rs]
            row["d_final_acc_ci95"] = t_interval(per["d_final_acc"])
            row["d_auc_acc_ci95"] = t_interval([a - statistics.mean(e["eval/accuracy"] for e in by[("grpo", s)]["evals"])
                                                for a, s in zip(per["auc_acc"], row["seeds"])])
            row["d_eval_reasoning_ci95"] = t_interval(d_eval_reason)
        rows.append(row)
    _versus_best_non_hint(rows, by)
    return rows


def rollouts(run: dict, per_step: int) -> int:
    """Completions sampled over a run: its `rollouts` metric (re-rolls and dynamic sampling's extra rounds
    included), or per_step (prompts_per_step x G) a step for runs from before the metric."""
    return int(sum(s.get("rollouts") or per_step for s in run["steps"]))


def _versus_best_non_hint(rows: list, by: dict) -> None:
    """Each hint arm's paired difference to the best non-hint arm (the one with the highest mean over seeds,
    chosen separately for final accuracy and for curve area) ± 95 % t-interval."""
    base = [r for r in rows if r["arm"] in NON_HINT]
    if not base:
        return
    curve = lambda run: statistics.mean(e["eval/accuracy"] for e in run["evals"])  # noqa: E731
    final = lambda run: run["evals"][-1]["eval/accuracy"]  # noqa: E731
    for key, metric in (("final_acc", final), ("auc_acc", curve)):
        best = max(base, key=lambda r: r[key][0])["arm"]
        for row in rows:
            if row["arm"] in NON_HINT:
                continue
            d = [metric(by[(row["arm"], s)]) - metric(by[(best, s)]) for s in row["seeds"] if (best, s) in by]
            row[f"best_non_hint_{key}"] = best
            row[f"d_best_{key}_ci95"] = t_interval(d) if d else None


def fmt(ms, digits=3, pct=False):
    m, s = ms if ms else (None, None)
    if m is None:
        return "-"
    if pct:
        return f"{100 * m:5.1f} ± {100 * s:4.1f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _ci(mh, scale=1.0, digits=1):
    m, h = mh if mh else (None, None)
    if m is None:
        return "-"
    return f"{scale * m:+.{digits}f} ± {scale * h:.{digits}f}" if h is not None else f"{scale * m:+.{digits}f}"


def print_table(rows, meta):
    print(f"\n## RTPO vs GRPO, {meta['regime']} regime: {meta['steps']} steps x {meta['prompts_per_step']} prompts x "
          f"G={meta['G']}, lr {meta['lr']:g}, {len(meta['seeds'])} seeds {meta['seeds']}; held-out accuracy with "
          f"no hint on {meta['eval_examples']} rows (greedy), mean ± std over seeds; Δ = paired difference to GRPO "
          f"± 95 % t-interval half-width; 'curve' = mean accuracy over the run's evaluations (area under the "
          f"curve); 'last' = mean over the last {meta['first_n']} steps")
    print(f"start (warm-started model, same for all arms): no-hint accuracy {fmt(rows[0]['start_acc'], pct=True)} %")
    best = next((r for r in rows if "best_non_hint_final_acc" in r), None)
    if best:
        print(f"best non-hint arm: {best['best_non_hint_final_acc']} (final accuracy), {best['best_non_hint_auc_acc']} "
              "(curve); 'Δ best' columns are paired differences to it")
    hdr = (f"{'arm':17} {'final acc %':>13} {'Δ vs GRPO (pp)':>15} {'Δ best (pp)':>13} {'curve acc %':>13} "
           f"{'Δ curve GRPO':>13} {'Δ curve best':>13} {'all-wrong 0-20':>15} "
           f"{'eval reason tok':>16} {'Δ reason tok':>13} {'mean keep':>10} {'fwd+bwd Mtok':>13} {'trace Mtok':>11} "
           f"{'rollouts k':>11} {'wall s/run':>11}")
    print("trace Mtok: the RL phase's supervised tokens (hint or SFT loss) plus every token of an SFT phase, prompts "
          "included (sft_then_grpo's supervised share of it equals rtpo_hint_loss's trace tokens by construction)")
    print(hdr)
    print("-" * len(hdr))
    per = lambda ms, unit: (ms[0] / unit, ms[1] / unit) if ms and ms[0] is not None else None  # noqa: E731
    for r in rows:
        print(f"{r['arm']:17} {fmt(r['final_acc'], pct=True):>13} {_ci(r.get('d_final_acc_ci95'), 100):>15} "
              f"{_ci(r.get('d_best_final_acc_ci95'), 100):>13} "
              f"{fmt(r['auc_acc'], pct=True):>13} {_ci(r.get('d_auc_acc_ci95'), 100):>13} "
              f"{_ci(r.get('d_best_auc_acc_ci95'), 100):>13} {fmt(r['all_wrong_first20'], 2):>15} "
              f"{fmt(r['final_eval_reasoning'], 1):>16} {_ci(r.get('d_eval_reasoning_ci95')):>13} "
              f"{fmt(r['keep_mean'], 2):>10} {fmt(per(r.get('fwd_tokens'), 1e6), 2):>13} "
              f"{fmt(per(r.get('sup_tokens'), 1e6), 3):>11} {fmt(per(r.get('rollouts'), 1e3), 1):>11} {fmt(r['wall_s'], 0):>11}")


# ----------------------------------------------------------------------------- plot

COLORS = {"grpo": "tab:gray", "grpo_sft": "black", "grpo_sft_decay": "tab:brown", "sft_then_grpo": "tab:olive",
          "rtpo_cosine": "tab:orange", "rtpo_per_example": "tab:green", "rtpo_hint_loss": "tab:red",
          "rtpo_on_demand": "tab:cyan", "rtpo_prefix_rft": "tab:pink", "rtpo_linear": "tab:blue",
          "rtpo_adaptive": "tab:purple", "grpo_dynamic": "navy", "rtpo_reroll": "goldenrod",
          "rtpo_reroll_hint_loss": "teal"}


STYLES = {"rtpo_adaptive": "--", "grpo_sft": "--", "grpo_sft_decay": "--", "sft_then_grpo": "--", "grpo_dynamic": "--"}  # adaptive can coincide with linear (it never lags it): keep both visible


def plot(runs, arms, path, title, smooth=None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[plot]')")
        return None
    import numpy as np

    if smooth is None:  # a trailing moving mean over ~1/24 of the run (none for short runs)
        smooth = max(1, len(runs[0]["steps"]) // 24)
    sm = f" (moving mean of {smooth})" if smooth > 1 else ""
    panels = [("evals", "eval/accuracy", "held-out accuracy, no hint (greedy)"),
              ("steps", "all_wrong_groups", "all-wrong groups (no signal)" + sm),
              ("steps", "mean_example_keep", "keep ratio (mean hint fraction given)"),
              ("steps", "reasoning_tokens", "generated reasoning tokens, training" + (f" (mean of {smooth})" if smooth > 1 else "")),
              ("evals", "eval/reasoning_tokens", "generated reasoning tokens, held-out no hint"),
              ("steps", "accuracy", "training accuracy" + sm)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (src, key, name) in zip(axes.flat, panels):
        for arm in arms:
            rs = [r for r in runs if r["arm"] == arm]
            if not rs:
                continue
            x = [p["step"] for p in rs[0][src]]
            ys = np.array([[p.get(key) if p.get(key) is not None else np.nan for p in r[src]] for r in rs], float)
            if src == "steps" and "keep" not in key and smooth > 1:
                k = np.ones(smooth) / smooth
                ys = np.array([np.convolve(np.pad(y, (smooth - 1, 0), mode="edge"), k, mode="valid") for y in ys])
            m, s = np.nanmean(ys, 0), np.nanstd(ys, 0)
            ax.plot(x, m, color=COLORS.get(arm), label=arm, marker="o" if src == "evals" else None, ms=3,
                    ls=STYLES.get(arm, "-"))
            if len(rs) > 1:
                ax.fill_between(x, m - s, m + s, color=COLORS.get(arm), alpha=0.15)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path, obj):
    """Indented, except each run (its per-step rows) on one line: the file stays small and diffable."""
    text = json.dumps({**obj, "runs": "\0RUNS"}, indent=1)
    runs = "[\n" + ",\n".join("  " + json.dumps(r) for r in obj["runs"]) + "\n ]"
    with open(path, "w") as f:
        f.write(text.replace('"\\u0000RUNS"', runs) + "\n")


# ----------------------------------------------------------------------------- main

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="24 steps, 2 seeds, 128 eval rows (under 5 min on 2 cores)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: run.max_steps)")
    ap.add_argument("--seeds", default=None, help="comma-separated run seeds (default 1,2,3)")
    ap.add_argument("--regime", default="hard", choices=list(REGIMES),
                    help="hard (--preset hard), starved, default or variant (round 3's untuned task variant)")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    ap.add_argument("--lr", type=float, default=None, help="optim.lr for every arm (default: the project default)")
    ap.add_argument("--eval-examples", type=int, default=None, help="held-out rows (default 512: SE ~2 pp)")
    ap.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 20)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any trainer config override for every arm, e.g. --set rollout.num_generations=16")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "rtpo_vs_grpo"),
                    help="run folders (metrics.jsonl, config.json, curves)")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side in worker processes (one torch thread "
                    "each; wall times then include the neighbours' load)")
    ap.add_argument("--summarize", metavar="JSON", default=None,
                    help="no training: recompute the summary, table and PNG of a results file this script wrote")
    ap.add_argument("--combine", nargs="+", metavar="JSON", default=None,
                    help="no training: the cross-regime table, round 3's criteria and the recommended arm of these "
                         "results files (one per regime)")
    ap.add_argument("--add-to", metavar="JSON", default=None,
                    help="run --arms for the seeds, regime, steps and evaluation of this results file and add them to "
                         "it (paired with its runs: same warm-start and seeds); its summary and PNG are recomputed")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/rtpo_vs_grpo[_quick].json); "
                    "the PNG goes beside it")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = os.path.join(ROOT, "benchmarks", "results",
                                f"rtpo_vs_grpo_{args.regime}" + ("_quick" if args.quick else "") + ".json")
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    return args


def plot_title(meta: dict) -> str:
    return (f"RTPO vs GRPO, {meta['regime']} regime: {meta['steps']} steps x {meta['prompts_per_step']} prompts x "
            f"G={meta['G']}, lr {meta['lr']:g}, seeds {meta['seeds']} (band: ±1 std over seeds)")


def resummarize(path: str) -> dict:
    """Recompute a results file's summary (and PNG) from its runs' stored curves, and print the table."""
    with open(path) as f:
        data = json.load(f)
    runs, meta = data["runs"], data["meta"]
    arms = [r["arm"] for r in data["summary"]]
    meta.setdefault("regime", data["env"]["args"].get("regime", "default"))
    data["summary"] = summarize(runs, arms, meta["first_n"], meta["prompts_per_step"] * meta["G"])
    plot(runs, arms, os.path.splitext(path)[0] + ".png", plot_title(meta))
    write_json(path, data)
    print_table(data["summary"], meta)
    return data


def run_all(arms: list, seeds: list, args) -> list:
    """Every (arm, seed) run, `--jobs` at a time in worker processes (the first alone: it builds the regime's
    cached warm-start). sft_then_grpo of a seed waits for that seed's rtpo_hint_loss and grpo_sft runs, whose
    token counts set its sft.steps. Returned seed-major, in `arms` order."""
    import concurrent.futures as cf
    import multiprocessing as mp

    jobs = [(a, s) for s in seeds for a in arms]
    deferred = [j for j in jobs if j[0] == "sft_then_grpo"]
    if deferred and not {"rtpo_hint_loss", "grpo_sft"} <= set(arms):
        raise SystemExit("sft_then_grpo needs the rtpo_hint_loss and grpo_sft arms (they set its sft.steps)")
    ready = [j for j in jobs if j not in deferred]
    done, total = {}, len(jobs)

    def report(r):
        done[(r["arm"], r["seed"])] = r
        ev = r["evals"]
        extra = f", sft.steps {r['sft_steps']}" if r["arm"] == "sft_then_grpo" else ""
        print(f"[{len(done)}/{total}] {r['arm']:16s} seed {r['seed']}: no-hint acc {ev[0]['eval/accuracy']:.3f} -> "
              f"{ev[-1]['eval/accuracy']:.3f}, keep {r['steps'][0]['keep']:.2f} -> {r['steps'][-1]['keep']:.2f}{extra}, "
              f"{r['wall_s']:.0f} s", flush=True)

    def job(arm, seed):
        sft = matched_sft_steps(done[("rtpo_hint_loss", seed)], done[("grpo_sft", seed)]) if arm == "sft_then_grpo" else 0
        return (arm, seed, args, args.workdir, sft)

    def ready_deferred():
        out = [j for j in deferred if ("rtpo_hint_loss", j[1]) in done and ("grpo_sft", j[1]) in done]
        for j in out:
            deferred.remove(j)
        return out

    report(_run_job(job(*ready.pop(0))))  # alone: builds (or loads) the warm-start every later run reuses
    if args.jobs <= 1:  # in this process, in order; a deferred run as soon as its inputs are done
        while ready or deferred:
            for j in ready_deferred() or [ready.pop(0)]:
                report(_run_job(job(*j)))
        return [done[j] for j in jobs]
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        pending = {pool.submit(_run_job, job(*j)) for j in ready}
        while pending:
            finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                report(f.result())
            for j in ready_deferred():
                pending.add(pool.submit(_run_job, job(*j)))
    return [done[j] for j in jobs]


def combine(paths: list) -> dict:
    """Across regimes (one results file each): every arm's final accuracy and its paired differences to GRPO and
    to the regime's best non-hint arm, the success criterion of round 3 (benchmarks/results/round3_plan.md)
    and the recommended hint arm by its rule: the highest final accuracy averaged over the regimes (ties: curve
    area), kept only if it loses to GRPO by at most 2 points final in every regime. Prints a table; returns it."""
    regimes = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        regimes[data["meta"]["regime"]] = {r["arm"]: r for r in data["summary"]}
    arms = list(dict.fromkeys(a for rows in regimes.values() for a in rows))
    hint_arms = [a for a in arms if a not in NON_HINT]
    pp = lambda ms: "-" if not ms or ms[0] is None else _ci(ms, 100)  # noqa: E731
    print("\n## Across regimes (criteria of benchmarks/results/round3_plan.md): final no-hint accuracy % (mean over seeds); Δ GRPO / Δ best non-hint: paired "
          "differences in points ± 95 % t-interval half-width; curve Δ best: the same for curve area")
    hdr = f"{'arm':17}" + "".join(f" | {r + ' final':>14} {'Δ GRPO':>13} {'Δ best':>13} {'curve Δ best':>13}"
                                   for r in regimes)
    print(hdr)
    print("-" * len(hdr))
    for arm in arms:
        line = f"{arm:17}"
        for rows in regimes.values():
            r = rows.get(arm)
            if r is None:
                line += f" | {'-':>14} {'-':>13} {'-':>13} {'-':>13}"
                continue
            line += (f" | {100 * r['final_acc'][0]:14.1f} {pp(r.get('d_final_acc_ci95')):>13} "
                     f"{pp(r.get('d_best_final_acc_ci95')):>13} {pp(r.get('d_best_auc_acc_ci95')):>13}")
        print(line)
    wins = []
    for regime, rows in regimes.items():
        for arm in hint_arms:
            r = rows.get(arm, {})
            for key, need in (("d_best_final_acc_ci95", 0.05), ("d_best_auc_acc_ci95", 0.10)):
                m, h = r.get(key) or (None, None)
                if m is not None and h is not None and m >= need and m - h > 0:
                    wins.append((regime, arm, key, m, h))
    complete = [a for a in hint_arms if all(a in rows for rows in regimes.values())]
    mean = lambda a, k: statistics.mean(rows[a][k][0] for rows in regimes.values())  # noqa: E731
    best = max(complete, key=lambda a: (mean(a, "final_acc"), mean(a, "auc_acc"))) if complete else None
    losses = {reg: rows[best]["d_final_acc_ci95"][0] for reg, rows in regimes.items()} if best else {}
    ok = bool(best) and all(d >= -0.02 for d in losses.values())
    print("\ncriterion 1 (a hint arm beats the best non-hint arm by >= 5 pp final or >= 10 pp curve, interval "
          "excluding 0): " + ("met: " + "; ".join(f"{a} in {g} ({'final' if 'final' in k else 'curve'} "
                                                   f"{100 * m:+.1f} ± {100 * h:.1f})" for g, a, k, m, h in wins)
                              if wins else "not met in any regime"))
    if best:
        print(f"recommended by the rule: {best} (mean final {100 * mean(best, 'final_acc'):.1f} % over "
              f"{len(regimes)} regimes); Δ final vs GRPO: " +
              ", ".join(f"{g} {100 * d:+.1f}" for g, d in losses.items()) +
              ("; criterion 2 (never more than 2 pp below GRPO) met" if ok else "; criterion 2 NOT met"))
    return {"regimes": list(regimes), "wins": wins, "recommended": best, "criterion2": ok, "losses": losses}


def add_to(path: str, args) -> dict:
    """Runs of args.arms added to an existing results file, at its settings (regime, seeds, steps, held-out rows,
    evaluation interval); the file records what was added when, and its summary, table and PNG are recomputed."""
    with open(path) as f:
        data = json.load(f)
    old = data["env"]["args"]
    for k in ("regime", "steps", "eval_examples", "eval_every", "lr"):
        setattr(args, k, old.get(k, getattr(args, k)))
    args.set = list(old.get("set", [])) + [kv for kv in args.set if kv not in old.get("set", [])]
    arms = args.arms.split(",")
    load0, t0 = os.getloadavg(), time.perf_counter()
    new = run_all(arms, data["meta"]["seeds"], args)
    keep = {(r["arm"], r["seed"]) for r in new}
    data["runs"] = [r for r in data["runs"] if (r["arm"], r["seed"]) not in keep] + \
        [{k: v for k, v in r.items() if k != "config"} for r in new]
    data["env"].setdefault("added", []).append(
        {"arms": arms, "date": time.strftime("%Y-%m-%d"), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
         "total_s": time.perf_counter() - t0, "rl_config": new[0]["config"]})
    summary_arms = [r["arm"] for r in data["summary"]]
    data["summary"] = [{"arm": a} for a in summary_arms + [a for a in arms if a not in summary_arms]]
    write_json(path, data)
    return resummarize(path)


def main(argv=None):
    args = parse(argv)
    if args.summarize:
        return resummarize(args.summarize)
    if args.combine:
        return combine(args.combine)
    if args.add_to:
        return add_to(args.add_to, args)
    import torch

    arms = args.arms.split(",")
    seeds = [int(s) for s in str(args.seeds).split(",")]
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    runs = run_all(arms, seeds, args)
    c = runs[0]["config"]
    n = len(runs[0]["steps"])
    first_n = max(1, min(10, n // 4))
    meta = {"regime": args.regime, "steps": n, "prompts_per_step": c["rollout"]["prompts_per_step"], "G": c["rollout"]["num_generations"],
            "lr": c["optim"]["lr"], "seeds": seeds, "eval_examples": args.eval_examples, "first_n": first_n}
    rows = summarize(runs, arms, first_n, meta["prompts_per_step"] * meta["G"])
    total = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    png = plot(runs, arms, os.path.splitext(args.out)[0] + ".png", plot_title(meta))
    rl_hparams = {"run.max_steps": c["run"]["max_steps"], "rollout": c["rollout"], "loss": c["loss"],
                  "optim": c["optim"], "rewards": c["rewards"], "curriculum (non-schedule)":
                  {k: v for k, v in c["curriculum"].items() if k != "schedule"}, "eval": c["eval"],
                  "warmstart": c["warmstart"], "model": c["model"]}
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "platform": platform.platform(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
           "total_s": total, "args": vars(args)}
    write_json(args.out, {"env": env, "meta": meta, "rl_hyperparameters": rl_hparams, "summary": rows,
                          "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs]})
    print(f"\nwrote {args.out}" + (f" and {png}" if png else "") +
          f" ({total / 60:.1f} min, load {load0[0]:.1f} -> {env['loadavg_end'][0]:.1f})")
    print_table(rows, meta)
    return {"runs": runs, "summary": rows, "meta": meta, "json": args.out, "png": png}


if __name__ == "__main__":
    main()
