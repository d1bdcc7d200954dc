"""Rollout throughput: rtpo.generation against transformers' generate and a cache-less loop.

Configs (same prompts, temperature 1, no top-k/top-p, forced length: no EOS):
  (a) hf_generate   model.generate(do_sample=True, num_return_sequences=G), transformers' own cache
  (b) no_cache      full recompute of the whole sequence for every new token (the naive loop below)
  (c) ours          rtpo.generation, every sample prefilled separately (share_prefix=False)
  (d) ours_shared   + group prefix sharing (each prompt prefilled once, KV replicated G times)
  (e) ours_static   + preallocated static KV cache
A second table ("compaction") lets rows end at staggered EOS tokens and compares dropping finished
rows from the batch at several thresholds.

Each config runs `--repeats` times, round-robin (a b c d e a b c ...) so machine load hits all alike;
the median wall time is reported. For the large model at long prompts the no-cache loop would take
many minutes, so it runs `--naive-steps` steps and its time is extrapolated to the full length by the
number of token positions it would process (marked with *).

  python benchmarks/bench_generation.py [--quick] [--out benchmarks/results/bench_generation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rtpo.generation import AUTO_COMPACT_FRACTION, SamplingConfig, generate  # noqa: E402

MODELS = {
    # the project's embedded default (rtpo.embedded): Qwen2, hidden 128, 4 layers, 4/2 heads
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384, vocab_size=100),
    # Qwen2-0.5B's shape with fewer layers (CPU)
    "large": dict(hidden_size=896, num_hidden_layers=4, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936),
}


def build_model(name: str, layers: int | None = None):
    from transformers import AutoModelForCausalLM, Qwen2Config

    kw = dict(MODELS[name])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = Qwen2Config(**kw, max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None  # forced length for (a) too
    return model


# ----------------------------------------------------------------------------- the configs

def hf_generate(model, prompts, G, T, seed, eos=()):
    """(a) transformers' generate with its own KV cache."""
    torch.manual_seed(seed)
    ids = torch.tensor(prompts)  # equal lengths: no padding
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, max_new_tokens=T, min_new_tokens=0, num_return_sequences=G,
                         eos_token_id=list(eos) or None, pad_token_id=0)
    gen = out[:, ids.shape[1]:]
    if eos:  # tokens up to the first EOS
        hit = torch.isin(gen, torch.tensor(list(eos)))
        ends = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full_like(hit[:, 0], T, dtype=torch.long))
        return int(ends.sum()), {}
    return gen.numel(), {}


def no_cache(model, prompts, G, T, seed, steps=None):
    """(b) the naive loop: every step recomputes the whole sequence (no KV cache)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(prompts).repeat_interleave(G, 0)
    steps = T if steps is None else min(steps, T)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
            tok = torch.multinomial(logits.softmax(-1), 1, generator=g)
            ids = torch.cat([ids, tok], 1)
    return ids.shape[0] * steps, {"steps_run": steps}


def ours(model, prompts, G, T, seed, eos=(), **kw):
    """(c)-(e): rtpo.generation.generate with the given options."""
    sc = SamplingConfig(max_new_tokens=T, temperature=1.0, eos_token_ids=tuple(eos))
    out = generate(model, prompts, sc, num_samples=G, generator=torch.Generator().manual_seed(seed), **kw)
    s = out.stats
    return s["tokens_generated"], {k: s[k] for k in ("prefill_s", "decode_s", "row_steps", "compactions")}


def naive_extrapolation(P: int, T: int, steps: int) -> float:
    """Time factor from `steps` no-cache steps to T: the work per step grows with the sequence."""
    return sum(P + t for t in range(T)) / sum(P + t for t in range(steps))


# ----------------------------------------------------------------------------- measurement

def measure(configs: dict, repeats: int) -> dict:
    """configs: name -> fn() returning (tokens, extra). Round-robin `repeats` times; returns medians."""
    times = {k: [] for k in configs}
    info = {}
    for _ in range(repeats):
        for name, fn in configs.items():
            t0 = time.perf_counter()
            tokens, extra = fn()
            times[name].append(time.perf_counter() - t0)
            info[name] = (tokens, extra)
    res = {}
    for name in configs:
        tokens, extra = info[name]
        res[name] = {"times_s": times[name], "median_s": statistics.median(times[name]), "tokens": tokens,
                     **{k: v for k, v in extra.items()}}
    return res


def throughput_table(model_name, model, P, args, naive_steps):
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(P)
    prompts = torch.randint(1, V, (args.prompts, P), generator=g).tolist()
    G, T = args.G, args.new_tokens
    configs = {
        "a hf_generate": lambda: hf_generate(model, prompts, G, T, 0),
        "b no_cache": lambda: no_cache(model, prompts, G, T, 0, naive_steps),
        "c ours": lambda: ours(model, prompts, G, T, 0, share_prefix=False),
        "d ours_shared": lambda: ours(model, prompts, G, T, 0, share_prefix=True),
        "e ours_shared_static": lambda: ours(model, prompts, G, T, 0, share_prefix=True, cache="static"),
    }
    hf_generate(model, prompts[:1], 1, 2, 0)  # warm-up: first-call allocations, lazy imports
    ours(model, prompts[:1], 1, 2, 0)
    res = measure(configs, args.repeats)
    b = res["b no_cache"]
    if b.get("steps_run", T) < T:
        f = naive_extrapolation(P, T, b["steps_run"])
        b["measured_median_s"] = b["median_s"]
        b["median_s"] *= f
        b["tokens"] = b["tokens"] * T // b["steps_run"]
        b["extrapolated"] = True
    rows = []
    ref = res["a hf_generate"]["median_s"]
    for name, r in res.items():
        rows.append({"model": model_name, "prompt_len": P, "G": G, "prompts": args.prompts, "new_tokens": T,
                     "config": name, "tok_per_s": r["tokens"] / r["median_s"], "speedup_vs_a": ref / r["median_s"],
                     **r})
    return rows


def compaction_table(model_name, model, P, args):
    """Rows end at EOS (one token in `every` is an EOS: ~1/every chance per step), so rows finish at
    staggered steps; compare never compacting with several thresholds."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(P + 1)
    prompts = torch.randint(1, V, (args.prompts, P), generator=g).tolist()
    G, T = args.G, args.new_tokens
    eos = tuple(range(0, V, args.eos_every))
    configs = {"hf_generate (eos)": lambda: hf_generate(model, prompts, G, T, 0, eos)}
    for label, c in [("never", False), ("any (True)", True), ("0.125", 0.125),
                     (f"auto ({AUTO_COMPACT_FRACTION})", "auto"), ("0.5", 0.5)]:
        configs[f"ours_shared compact={label}"] = (
            lambda c=c: ours(model, prompts, G, T, 0, eos=eos, share_prefix=True, compact=c))
    ours(model, prompts[:1], 1, 2, 0)
    res = measure(configs, args.repeats)
    ref = res["ours_shared compact=never"]["median_s"]
    return [{"model": model_name, "prompt_len": P, "G": G, "prompts": args.prompts, "new_tokens": T,
             "eos_every": args.eos_every, "config": name, "tok_per_s": r["tokens"] / r["median_s"],
             "speedup_vs_never": ref / r["median_s"], **r} for name, r in res.items()]


def print_table(title, rows, ratio_key, ratio_label):
    print(f"\n## {title}")
    hdr = f"{'model':6} {'P':>4} {'config':32} {'wall s':>9} {'tok/s':>9} {ratio_label:>14} {'prefill s':>9} " \
          f"{'decode s':>9} {'row-steps':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        mark = "*" if r.get("extrapolated") else " "
        pre = f"{r['prefill_s']:9.3f}" if "prefill_s" in r else f"{'':9}"
        dec = f"{r['decode_s']:9.3f}" if "decode_s" in r else f"{'':9}"
        rs = f"{r['row_steps']:9d}" if "row_steps" in r else f"{'':9}"
        print(f"{r['model']:6} {r['prompt_len']:4d} {r['config']:32} {r['median_s']:8.3f}{mark} "
              f"{r['tok_per_s']:9.1f} {r[ratio_key]:13.2f}x {pre} {dec} {rs}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run, < 1 min")
    ap.add_argument("--out", default="benchmarks/results/bench_generation.json")
    ap.add_argument("--models", default="tiny,large")
    ap.add_argument("--prompt-lens", default="64,512")
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large-layers", type=int, default=4)
    ap.add_argument("--naive-steps", type=int, default=4,
                    help="no-cache steps actually run for the large model (extrapolated to --new-tokens)")
    ap.add_argument("--eos-every", type=int, default=24, help="compaction table: 1 token in N is an EOS")
    ap.add_argument("--compaction-prompt-lens", default="64,512")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.quick:  # the tiny model only, short runs
        args.models, args.new_tokens, args.repeats, args.compaction_prompt_lens = "tiny", 16, 1, "64"
    if args.threads:
        torch.set_num_threads(args.threads)

    load0 = os.getloadavg()
    t_start = time.perf_counter()
    rows, crows = [], []
    for name in args.models.split(","):
        model = build_model(name, args.large_layers if name == "large" else None)
        for P in [int(p) for p in args.prompt_lens.split(",")]:
            rows += throughput_table(name, model, P, args, args.naive_steps if name == "large" else None)
        for P in [int(p) for p in args.compaction_prompt_lens.split(",")]:
            crows += compaction_table(name, model, P, args)
    print_table(f"throughput (G={args.G}, {args.prompts} prompts, {args.new_tokens} new tokens, "
                f"median of {args.repeats}; * = extrapolated)", rows, "speedup_vs_a", "vs (a)")
    print_table(f"compaction (EOS ~1/{args.eos_every} per step)", crows, "speedup_vs_never", "vs never")

    env = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "platform": platform.platform(),
           "loadavg_start": load0, "loadavg_end": os.getloadavg(), "total_s": time.perf_counter() - t_start,
           "args": vars(args)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"env": env, "throughput": rows, "compaction": crows}, f, indent=1)
    print(f"\nwrote {args.out} ({env['total_s']:.0f} s, load {load0[0]:.1f} -> {env['loadavg_end'][0]:.1f})")


if __name__ == "__main__":
    main()
