"""The one table of benchmarks/gpu_check.sh: each step's status and headline figure, from the logs
and JSON files it left in its output folder (also written there as gpu_check.json).

  python benchmarks/gpu_check_report.py benchmarks/results/gpu_check
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# rollout vs generate at G 8 / prompt 512; update MFU; decode share of its roofline; SmolLM2 RL step vs TRL
# (the smallest of TRL/rtpo over its goal per keep: 2x at keep 0, 3x at keep 1; >= 1 meets both)
GOALS = {"bench_generation": 2.0, "update_mfu": 0.40, "decode_roofline": 0.50, "trl_smollm2": 1.0}
TRL_GOALS = {0.0: 2.0, 1.0: 3.0}
SKIPPED = {"zero_nccl": ("skipped (1 GPU)", "needs >= 2 GPUs"),
           "trl_smollm2": ("skipped (no TRL)", "TRL is not installed: pip install -e '.[bench]'")}


def _json(folder, name):
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tail(folder, name, pattern):
    try:
        text = open(os.path.join(folder, f"{name}.log"), errors="replace").read()
    except OSError:
        return None
    hits = re.findall(pattern, text)
    return hits[-1] if hits else None


def _pytest_summary(name):
    """The step `name`'s pytest summary line ("4 passed, 1 skipped in 9.1s")."""
    return lambda folder: _tail(folder, name, r"\n=*\s*([^\n]*(?:passed|failed|skipped|error)[^\n]*?)\s*=*\n") or "no summary"


cuda_tests, zero_nccl = _pytest_summary("cuda_tests"), _pytest_summary("zero_nccl")


def bench_logprobs(folder):
    d = _json(folder, "bench_logprobs.json")
    if not d:
        return "no JSON"
    rows = [r for r in d["results"] if r.get("impl") != "naive" and not r.get("error")]
    if not rows:
        return "no results"
    big = max(rows, key=lambda r: (r["V"], r["N"]))
    return (f"{d.get('device_name') or d.get('device')}: V {big['V']}, N {big['N']}: {big['impl']} "
            f"{1 / big['time_vs_naive']:.2f}x faster, {1 / big['mem_vs_naive']:.1f}x less memory than materialised logits")


def bench_generation(folder):
    d = _json(folder, "bench_generation.json")
    if not d:
        return "no JSON", None
    rows = {r["config"]: r for r in d["throughput"] if r.get("G") == 8 and r.get("prompt_len") == 512}
    hf = rows.get("a hf_generate")
    best = max((r for k, r in rows.items() if k.split()[1].startswith("ours")), key=lambda r: r["tok_per_s"], default=None)
    if not (hf and best):
        return "no G 8 / prompt 512 rows", None
    ratio = best["tok_per_s"] / hf["tok_per_s"]
    return (f"{best['config'].split()[1]} {best['tok_per_s']:.0f} tok/s vs generate {hf['tok_per_s']:.0f}: "
            f"{ratio:.2f}x (goal >= {GOALS['bench_generation']:.0f}x)"), ratio


def smollm2_rtpo(folder):
    from rtpo.metrics import read_metrics

    run = os.path.join(folder, "smollm2_run")
    if not os.path.isfile(os.path.join(run, "metrics.jsonl")):
        return "no metrics"
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    cfg = _json(run, "config.json") or {}
    n = cfg.get("rollout", {}).get("prompts_per_step", 0) * cfg.get("rollout", {}).get("num_generations", 0)
    train = [r for r in rows if "time_rollout" in r]
    if not train:
        return "no training steps"
    tokens = sum(r["completion_tokens"] * n for r in train)
    gen_s, step_s = sum(r["time_rollout"] for r in train), sum(r["time_step"] for r in train)
    s = _json(run, "summary.json") or {}
    acc = (s.get("eval_before", {}).get("eval/accuracy"), s.get("eval_after", {}).get("eval/accuracy"))
    acc_text = f", held-out accuracy {acc[0]:.3f} -> {acc[1]:.3f}" if None not in acc else ""
    return (f"{len(train)} steps, {step_s / len(train):.2f} s/step, rollout {tokens / gen_s:.0f} generated tok/s, "
            f"{tokens / step_s:.0f} tok/s overall{acc_text}")


def update_mfu(folder):
    d = _json(folder, "bench_update_flops.json")
    if not d:
        return "no JSON", None
    return (f"{_rate(d['achieved_flops_fwd_bwd'])} fwd+bwd of a {_rate(d['matmul_peak_flops'])} {d['dtype'][6:]} "
            f"matmul peak: MFU {d['mfu_fwd_bwd']:.1%} (whole update with optimizer {d['mfu_update']:.1%}; "
            f"goal >= {GOALS['update_mfu']:.0%})"), d["mfu_fwd_bwd"]


def decode_roofline(folder):
    d = _json(folder, "bench_decode_roofline.json")
    if not d:
        return "no JSON", None
    h = d["headline_forced_length"]
    lev = ", ".join(f"{r['lever']} {r['speedup_vs_default']:.2f}x" for r in d.get("levers", [])
                    if r["lever"] != "default" and r.get("speedup_vs_default"))
    return (f"{h['rows']} rows: {h['decode_tokens_per_s']:.0f} tok/s of a {h['roofline_tokens_per_s']:.0f} tok/s "
            f"roofline ({h['memory_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, {_rate(h['matmul_peak_flops'])}): "
            f"{h['efficiency']:.1%} (goal >= {GOALS['decode_roofline']:.0%})" + (f"; levers {lev}" if lev else "")), \
        h["efficiency"]


def trl_smollm2(folder):
    d = _json(folder, "bench_vs_trl_smollm2.json")
    if not d or not d.get("timing"):
        return "no timing", None
    parts, worst = [], None
    for t in d["timing"]:
        r, goal = t["ratio_of_medians"], TRL_GOALS.get(t["keep"])
        parts.append(f"keep {t['keep']:g}: TRL/rtpo {r:.2f}x" + (f" (goal {goal:g}x)" if goal else "")
                     + f", rollout {t['rollout_ratio']:.2f}x, update {t['update_ratio']:.2f}x")
        if goal:
            worst = r / goal if worst is None else min(worst, r / goal)
    return "; ".join(parts), worst


def _rate(flops):
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def main(folder):
    steps = []
    with open(os.path.join(folder, "steps.tsv")) as f:
        for line in f:
            name, rc, secs = line.rstrip("\n").split("\t")
            steps.append((name, rc, int(secs)))
    report, out = {"bench_generation": bench_generation, "update_mfu": update_mfu, "cuda_tests": cuda_tests,
                   "bench_logprobs": bench_logprobs, "smollm2_rtpo": smollm2_rtpo, "zero_nccl": zero_nccl,
                   "decode_roofline": decode_roofline, "trl_smollm2": trl_smollm2}, []
    print("| check | status | s | result |")
    print("|---|---|---|---|")
    for name, rc, secs in steps:
        skip_status, skip_text = SKIPPED.get(name, ("skipped", ""))
        status = skip_status if rc == "skipped" else ("ok" if rc == "0" else ("timeout" if rc == "124" else f"rc {rc}"))
        fig = report[name](folder) if rc != "skipped" else skip_text
        text, value = fig if isinstance(fig, tuple) else (fig, None)
        if value is not None and name in GOALS:
            status += ", goal met" if value >= GOALS[name] else ", goal missed"
        print(f"| {name} | {status} | {secs} | {text} |")
        out.append({"check": name, "rc": rc, "seconds": secs, "result": text, "value": value})
    print(f"total {sum(s for _, _, s in steps)} s")
    with open(os.path.join(folder, "gpu_check.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join("benchmarks", "results", "gpu_check"))
