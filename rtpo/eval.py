"""Evaluate a checkpoint: greedy accuracy, format and reasoning length at each hint fraction.

    python -m rtpo.eval CHECKPOINT [--keep 0,0.5,1] [--dataset NAME] [--num-examples N]
                        [--batch-size B] [--max-new-tokens T] [--out FILE.json | --out -]
                        [--samples K] [--no-progress] [--section.key value ...]
    rtpo-eval CHECKPOINT ...              # the same, as a console script (after pip install -e .)

CHECKPOINT is any of:
- a checkpoint folder `<run>/checkpoints/step_N` (full weights; DeepSpeed runs save them too);
- a run folder `<run>`: its newest complete checkpoint;
- a PEFT adapter folder (`adapter_config.json`; needs `pip install -e ".[lora]"`), merged into
  its base model for evaluation: a LoRA run's checkpoints are such folders (its run folder works too);
- anything `--model` accepts: `embedded`, `smollm2-135m`, a `.gguf` file, a hub name, a model folder
  (e.g. the "before RL" row: `python -m rtpo.eval smollm2-135m --preset smollm2`).

The run's own config (`<run>/config.json`, else the checkpoint's trainer_state.pt) decides the
prompt format (chat template, system prompt, think tags, injection mode) and the dataset and its
held-out rows, so a checkpoint is scored on exactly what its run evaluated; `--dataset` and any
`--section.key value` override it, `--preset` and `--config` work as in train.py. Each hint fraction
keep cuts every held-out row's trace to floor(keep * n) tokens, as in training (keep 0 = the
evaluation prompt). The run is built as training builds it (rtpo.run.setup, without an optimizer or
an output folder); decoding is greedy, in batches of eval.batch_size, and scoring is training's
(rtpo.evaluation): accuracy, format and every configured reward function.

Prints a table (or JSON with `--out -`), and writes JSON with `--out FILE.json`.
Exit codes: 0 done, 2 bad checkpoint / config / data, 3 a reward function failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from rtpo import checkpoint as ckpt
from rtpo.config import ConfigError, RTPOConfig, apply_dict
from rtpo.cli import parse_args
from rtpo.backends import LocalBackend
from rtpo.comm import Comm
from rtpo.evaluation import Evaluation
from rtpo.run import Run, setup

ADAPTER_FILE = "adapter_config.json"


def _read_config(path: str):
    """The saved run config of a folder inside a run, or None: <run>/config.json when the folder is
    <run>/checkpoints/<name>, else the config stored in the folder's trainer_state.pt."""
    parent = os.path.dirname(os.path.abspath(path))
    run_json = os.path.join(os.path.dirname(parent), "config.json")
    if os.path.basename(parent) == ckpt.CKPT_DIR and os.path.isfile(run_json):
        with open(run_json, encoding="utf-8") as f:
            return json.load(f)
    if os.path.isfile(os.path.join(path, ckpt.STATE_FILE)):
        try:
            return ckpt.load_state(path).get("config")
        except ckpt.CheckpointError as e:
            raise ConfigError(str(e)) from None
    return None


def _apply_saved(cfg: RTPOConfig, saved: dict, log) -> RTPOConfig:
    """Apply a saved config key by key; keys this version does not know are skipped with a note."""
    skipped = []
    for sec, values in (saved or {}).items():
        for k, v in (values.items() if isinstance(values, dict) else []):
            try:
                apply_dict(cfg, {f"{sec}.{k}": v})
            except ConfigError:
                skipped.append(f"{sec}.{k}")
    if skipped:
        log(f"[rtpo.eval] note: saved config keys not known to this version were ignored: {', '.join(skipped)}")
    return cfg


def resolve_checkpoint(target: str, log=print) -> tuple:
    """(kind, weights path or model name, saved config dict or None) for CHECKPOINT; kind is
    "checkpoint" (rtpo checkpoint folder, or a run folder's newest), "adapter" or "model"."""
    if os.path.isdir(target):
        if os.path.isfile(os.path.join(target, ADAPTER_FILE)):
            return "adapter", target, _read_config(target)
        if os.path.isfile(os.path.join(target, ckpt.STATE_FILE)):
            return "checkpoint", target, _read_config(target)
        if ckpt.list_checkpoints(target):
            try:
                path = ckpt.resolve_resume(target, log=log)
            except (FileNotFoundError, getattr(ckpt, "CheckpointError", FileNotFoundError)) as e:
                raise ConfigError(f"checkpoint {target!r}: {e}") from None
            log(f"[rtpo.eval] newest checkpoint of {target}: {path}")
            return ("adapter" if os.path.isfile(os.path.join(path, ADAPTER_FILE)) else "checkpoint"), path, _read_config(path)
        if os.path.isdir(os.path.join(target, ckpt.CKPT_DIR)):
            raise ConfigError(f"checkpoint {target!r}: a run folder without a complete checkpoint")
        return "model", target, None
    # a path that does not exist (a hub name has one slash: org/name)
    if not os.path.exists(target) and (target.startswith((".", os.sep)) or target.count("/") > 1):
        raise ConfigError(f"checkpoint {target!r}: no such folder")
    return "model", target, None


def load_run(cfg: RTPOConfig, adapter: str | None = None, log=print):
    """The run of CHECKPOINT on one process, for evaluation only: no optimizer, nothing read from or
    written to an output folder; `adapter`: a PEFT adapter merged into its base model."""
    return setup(cfg, LocalBackend(cfg), log, train=False, adapter=adapter)


def build_config(target: str, argv: list, log=print, num_examples: int | None = None) -> tuple:
    """(config, adapter path or None) for evaluating CHECKPOINT with the extra `--key value` argv;
    `num_examples` (--num-examples) above data.num_eval raises it: the held-out split must hold that many rows."""
    kind, path, saved = resolve_checkpoint(target, log=log)
    cfg = _apply_saved(RTPOConfig(), saved, log) if saved else RTPOConfig()
    cfg = parse_args(list(argv), base=cfg)
    cfg.model.name = path  # an adapter's base model is named in its adapter_config.json
    if kind in ("checkpoint", "adapter"):
        cfg.warmstart.enabled = "false"  # trained weights: never warm-start them again
    cfg.model.lora.r = 0  # an adapter is evaluated merged into its base: no fresh adapter on top
    # evaluation only: no reference model, no resume (rtpo.run.setup with train=False reads no output folder)
    cfg.loss.beta = 0.0
    cfg.run.resume = None
    cfg.log.report_to = "none"
    cfg.run.deepspeed = None  # one process; a DeepSpeed run's checkpoint holds ordinary weights too
    if not any(a.split("=")[0] in ("--run.device", "--device") for a in argv):
        cfg.run.device = "auto"  # the saved device (e.g. a training rank's cuda:0) may not exist here
    if num_examples is not None and num_examples > cfg.data.num_eval:
        cfg.data.num_eval = num_examples
    return cfg.validate(), (path if kind == "adapter" else None)


def evaluate_keeps(run: Run, keeps, num_examples: int | None = None, progress: bool = True,
                   samples: int = 3, log=print) -> list:
    """Greedy evaluation of the run's first `num_examples` held-out rows at each hint fraction
    -> one dict per keep: accuracy, correct, n, format, reasoning_tokens, completion_tokens,
    injected_tokens, reward/<fn>, seconds and the first `samples` rows' records."""
    from tqdm.auto import tqdm

    n = len(run.eval_enc) if num_examples is None else min(num_examples, len(run.eval_enc))
    encs, rows = run.eval_enc[:n], run.eval_rows[:n]
    evaluation = Evaluation(run, Comm())  # one process
    bar = tqdm(total=n * len(keeps), disable=not progress, desc="rtpo.eval", dynamic_ncols=True, file=sys.stderr)
    out = []
    try:
        for keep in keeps:
            bar.set_postfix(keep=f"{keep:g}", refresh=False)
            t0 = time.perf_counter()
            metrics, records = evaluation.evaluate_at(float(keep), encs, rows, progress=bar.update)
            r = {"keep": float(keep), "n": len(records), "correct": int(sum(x["correct"] for x in records)), **metrics,
                 "seconds": time.perf_counter() - t0, "samples": records[:samples]}
            out.append(r)
            if not progress:
                log(f"  keep {keep:g}: accuracy {r['accuracy']:.3f} ({r['correct']}/{r['n']}), format "
                    f"{r['format']:.2f}, {r['reasoning_tokens']:.1f} reasoning / {r['completion_tokens']:.1f} "
                    f"completion tokens, {r['seconds']:.0f} s")
    finally:
        bar.close()
    return out


def table(results: list) -> str:
    lines = ["| keep | accuracy | correct | format | reasoning tokens | completion tokens | injected tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['keep']:g} | {r['accuracy']:.3f} | {r['correct']}/{r['n']} | {r['format']:.3f} | "
                     f"{r['reasoning_tokens']:.1f} | {r['completion_tokens']:.1f} | {r['injected_tokens']:.1f} |")
    return "\n".join(lines)


def parse_keeps(text: str) -> list:
    try:
        keeps = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--keep {text!r}: expected comma-separated numbers in [0, 1], e.g. 0,0.5,1") from None
    if not keeps or any(not 0 <= k <= 1 for k in keeps):
        raise ConfigError(f"--keep {text!r}: every hint fraction must be in [0, 1]")
    return keeps


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m rtpo.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint folder, run folder, adapter folder or model name")
    ap.add_argument("--keep", default="0", help="comma-separated hint fractions (default 0: no hint)")
    ap.add_argument("--dataset", help="data.dataset to evaluate on (default: the run's)")
    ap.add_argument("--num-examples", type=int, help="held-out rows (default: the run's eval.num_examples); above "
                    "data.num_eval it raises data.num_eval, which for a dataset without an eval split holds out "
                    "more rows from its end")
    ap.add_argument("--batch-size", type=int, help="rows decoded at once (eval.batch_size)")
    ap.add_argument("--max-new-tokens", type=int, help="completion length limit (eval.max_new_tokens)")
    ap.add_argument("--samples", type=int, default=3, help="rows per keep whose text goes into the JSON")
    ap.add_argument("--out", help="write JSON here; '-' prints JSON instead of the table")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, overrides = ap.parse_known_args(argv)
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    extra = list(overrides)
    for flag, key in ((args.dataset, "data.dataset"), (args.batch_size, "eval.batch_size"),
                      (args.max_new_tokens, "eval.max_new_tokens"), (args.num_examples, "eval.num_examples")):
        if flag is not None:
            extra += [f"--{key}", str(flag)]
    from rtpo.data import DataError
    from rtpo.stages import TrainingError

    try:
        keeps = parse_keeps(args.keep)
        cfg, adapter = build_config(args.checkpoint, extra, log=log, num_examples=args.num_examples)
        if cfg.eval.num_examples <= 0:
            raise ConfigError("eval.num_examples = 0: nothing to evaluate; pass --num-examples N")
        t0 = time.perf_counter()
        run = load_run(cfg, adapter=adapter, log=log)
        log(f"[rtpo.eval] {args.checkpoint}: {min(cfg.eval.num_examples, len(run.eval_rows))} held-out rows of "
            f"{cfg.data.dataset!r}, keep {', '.join(f'{k:g}' for k in keeps)}; setup {time.perf_counter() - t0:.1f} s")
        results = evaluate_keeps(run, keeps, cfg.eval.num_examples, progress=not args.no_progress, samples=args.samples,
                                 log=log)
    except (ConfigError, DataError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 3
    report = {"checkpoint": args.checkpoint, "weights": adapter or cfg.model.name, "dataset": cfg.data.dataset,
              "num_examples": results[0]["n"] if results else 0, "greedy": True,
              "max_new_tokens": cfg.eval.max_new_tokens, "results": results, "config": cfg.to_dict()}
    if args.out == "-":
        print(json.dumps(report, indent=2))
    else:
        print(table(results))
    if args.out and args.out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        ckpt.write_json(args.out, report)  # atomic
        log(f"[rtpo.eval] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
