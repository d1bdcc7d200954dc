"""Log-prob pass layouts (rtpo.logprobs): forward + backward time per layout and regime.

Layouts: `padded` (one left-padded row per completion), `one tree` (packed, one tree per group: the
prompt once, all G completions after it), `rule` (packed, each group cut into trees of
tree_completions(P, T, H) completions: rtpo's default), `unshared` (packed, the prompt copied per
completion). Regimes: 2 groups of G = 8 with prompt length P and completions of 1 .. 2T - 1 tokens
(uniform, mean T: rows end at different lengths, as sampled ones do). The model is the
embedded one (rtpo.embedded, H = 128, 4 layers), float32, 1 thread; the layouts are interleaved
(one of each, `--repeats` times) and the median is reported.

    python benchmarks/bench_packing.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

REGIMES = [(20, 200), (40, 100), (42, 25), (60, 5), (300, 30)]  # (P, T): long answers ... RTPO's long hints
LAYOUTS = ["padded", "one tree", "rule", "unshared"]


def batch(layout, prompts, comps, hidden):
    from rtpo.logprobs import collate, pack

    if layout == "padded":
        return collate(prompts, comps, 0)
    kw = {"one tree": {}, "rule": {"hidden_size": hidden}, "unshared": {"share_prefix": False}}[layout]
    return pack(prompts, comps, 0, **kw)


def fwd_bwd(model, b) -> float:
    from rtpo.logprobs import completion_logprobs

    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    logp, ent = completion_logprobs(model, b)
    (logp.sum() + ent.sum()).backward()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/bench_packing.json"))
    args = ap.parse_args()
    import torch

    from rtpo.embedded import build_model, build_tokenizer
    from rtpo.logprobs import tree_completions

    torch.set_num_threads(1)
    tok = build_tokenizer()
    model = build_model(tok)
    hidden = model.config.hidden_size
    g = random.Random(0)
    rows = []
    for P, T in REGIMES:
        prompts, comps = [], []
        for _ in range(args.groups):
            p = [g.randrange(6, len(tok)) for _ in range(P)]
            prompts += [p] * args.G
            comps += [[g.randrange(6, len(tok)) for _ in range(g.randint(1, 2 * T - 1))] for _ in range(args.G)]
        batches = {name: batch(name, prompts, comps, hidden) for name in LAYOUTS}
        times = {name: [] for name in LAYOUTS}
        fwd_bwd(model, batches["padded"])  # warm-up
        for r in range(args.repeats):
            for name in LAYOUTS[r % len(LAYOUTS):] + LAYOUTS[:r % len(LAYOUTS)]:  # rotate the order
                times[name].append(fwd_bwd(model, batches[name]))
        med = {name: statistics.median(v) for name, v in times.items()}
        positions = {name: int(b["input_ids"].numel()) for name, b in batches.items()}
        rows.append({"prompt_len": P, "completion_len": T, "tree_completions": tree_completions(P, T, hidden),
                     "median_s": med, "positions": positions, "times_s": times})
        print(f"P {P:4d} T {T:4d} m* {rows[-1]['tree_completions']:3d}  " +
              "  ".join(f"{n} {med[n]:.3f}" for n in LAYOUTS), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"groups": args.groups, "G": args.G, "hidden_size": hidden, "threads": 1,
                   "loadavg": os.getloadavg(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\n## log-prob pass fwd + bwd, {args.groups} groups x G = {args.G}, embedded model, median of "
          f"{args.repeats} (s; positions in brackets)")
    print(f"{'P':>4} {'T':>5} {'m*':>4} " + " ".join(f"{n:>17}" for n in LAYOUTS))
    for r in rows:
        print(f"{r['prompt_len']:4d} {r['completion_len']:5d} {r['tree_completions']:4d} " +
              " ".join(f"{r['median_s'][n]:8.3f} ({r['positions'][n]:6d})" for n in LAYOUTS))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
