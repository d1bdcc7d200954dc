"""Rollout decode throughput against this machine's roofline, where the time goes, and the levers tried.

The model and prompts are the trainer's (`--preset smollm2`: SmolLM2-135M on wordproblems, offline),
decoded by rtpo.generation.generate exactly as the sampler calls it (prefix shared, dynamic cache,
compaction "auto"), fp32, in eval mode. Sizes default to issue 23's rollout shape: 4 prompts x G 8,
128 new tokens. The headline run forces the full length (no EOS), so every decode step runs all rows.

Roofline of one decode step (B rows, row r attending to ctx_r real positions; fp32 on CPU, 4 bytes a
value; on CUDA bf16 autocast, 2):
  bytes  = 4 * (N_body + H * V)                    every weight read once: decoder body and the LM head
         + 4 * 2 * L * kv_heads * head_dim * sum(ctx_r)    keys and values read by attention
  FLOPs  = 2 * B * (N_body + H * V)                every row through every matmul
         + 4 * L * heads * head_dim * sum(ctx_r)   q.k and p.v per head
  time   = max(bytes / measured bandwidth, FLOPs / measured matmul peak)
N_body = parameters without the embedding table (the input embedding reads B rows only; a tied LM head
is the same matrix, counted as H * V). Sampling, norms and activations are not in the roofline: they
are part of what the profile calls the rest. The roofline of the decode is the sum over its steps
(T - 1 forwards: the first token comes from the prefill's logits); efficiency = roofline / measured.

Both limits are measured in this process at its thread count: bandwidth as the best read rate of a
1 GiB fp32 tensor (torch.sum), the matmul peak as in bench_update_flops.py (best square matmul in the
compute dtype).
They vary by machine and by load: the table reports them beside the ratio.

Profile (torch.profiler, one forced-length generate of --profile-tokens tokens): self CPU time per op, grouped as matmuls of the
decoder body, the LM head (any matmul with a vocabulary-sized dimension), attention (inside
scaled_dot_product_attention), sampling (inside rtpo.generation.sample_tokens), other ops (norms, RoPE,
elementwise, cache concatenation), and Python / framework overhead = wall time - every op's self time.

Levers, each an option of rtpo.generation, A/B in one run with the configs interleaved per repeat and
real EOS (what the trainer runs): compaction of finished rows off vs "auto"; the static cache; the
static cache with torch.compile on CPU (inductor; its compile time is reported apart, not timed);
the prefill's LM head at every position instead of only the last (logits_to_keep off); sampling
compiled by torch.compile (fused kernels).

  python benchmarks/bench_decode_roofline.py [--threads 1] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import rtpo.generation as gen  # noqa: E402
from rtpo.generation import SamplingConfig, generate  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_update_flops import _sync, matmul_peak as square_matmul_peak, model_shape  # noqa: E402

FP32 = 4


# ----------------------------------------------------------------------------- the arithmetic

def decode_shape(model) -> dict:
    """The dimensions the roofline needs (text decoder): bench_update_flops.model_shape's, with the body
    counted without the LM head (an untied head is read as the head), and the attention's head counts."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    s = model_shape(model)
    heads = cfg.num_attention_heads
    return {"params": s["params"], "body_params": s["body_params"] - (0 if head is emb else head.numel()),
            "hidden": s["hidden"], "vocab": head.shape[0], "layers": s["layers"], "heads": heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": s["attn_width"] // heads, "tied": head is emb,
            "bytes_per_value": emb.element_size()}


def step_cost(shape: dict, ctx: list) -> dict:
    """Bytes read and FLOPs of one decode step; ctx[r] = positions row r attends to (its new token included)."""
    s = shape
    nb = s.get("bytes_per_value", FP32)
    w = s["body_params"] + s["hidden"] * s["vocab"]
    n_ctx = sum(ctx)
    kv_bytes = nb * 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * n_ctx
    return {"bytes": nb * w + kv_bytes, "weight_bytes": nb * w, "kv_bytes": kv_bytes,
            "flops": 2 * len(ctx) * w + 4 * s["layers"] * s["heads"] * s["head_dim"] * n_ctx}


def decode_roofline(shape: dict, prompt_lens: list, lengths: list, bandwidth: float, peak: float) -> dict:
    """Roofline of a decode: rows with prompt lengths `prompt_lens` generating `lengths` tokens each.
    Forward t (t = 1 .. len - 1) feeds token t - 1 of a row that attends to prompt + t positions."""
    T = max(lengths)
    tot = {"bytes": 0, "flops": 0, "weight_bytes": 0, "kv_bytes": 0, "seconds": 0.0, "memory_bound_steps": 0,
           "forwards": 0}
    for t in range(1, T):
        ctx = [p + t for p, n in zip(prompt_lens, lengths) if n > t]
        c = step_cost(shape, ctx)
        for k in ("bytes", "flops", "weight_bytes", "kv_bytes"):
            tot[k] += c[k]
        mem, comp = c["bytes"] / bandwidth, c["flops"] / peak
        tot["seconds"] += max(mem, comp)
        tot["memory_bound_steps"] += mem >= comp
        tot["forwards"] += 1
    return tot


# ----------------------------------------------------------------------------- machine limits

def memory_bandwidth(gib: float = 1.0, reps: int = 5, device=torch.device("cpu")) -> dict:
    """Best read bandwidth (bytes/s): torch.sum over a float32 tensor of `gib` GiB, far above the caches."""
    x = torch.ones(int(gib * 2**30) // FP32, device=device)
    x.sum()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"bytes_per_s": x.numel() * FP32 / min(times), "gib": gib}


def matmul_peak(device=torch.device("cpu"), dtype=torch.float32) -> float:
    return square_matmul_peak(device, dtype, (4096, 8192) if device.type == "cuda" else (512, 1024, 2048))["flops"]


# ----------------------------------------------------------------------------- profile

PROFILE_GROUPS = ("matmul (body)", "LM head", "attention", "sampling", "other ops", "Python / framework")


@contextlib.contextmanager
def labelled_sampling():
    """rtpo.generation.sample_tokens inside a profiler range, so that its ops are counted as sampling."""
    orig = gen.sample_tokens

    def wrapped(*a, **k):
        with torch.profiler.record_function("rtpo.sample_tokens"):
            return orig(*a, **k)
    gen.sample_tokens = wrapped
    try:
        yield
    finally:
        gen.sample_tokens = orig


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")


def classify(event, vocab: int) -> str:
    names = []
    e = event
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    if "rtpo.sample_tokens" in names:
        return "sampling"
    if any("scaled_dot_product" in n or n == "attention" for n in names):
        return "attention"
    if event.name in MATMULS:
        shapes = getattr(event, "input_shapes", None) or []
        return "LM head" if any(vocab in (s or []) for s in shapes) else "matmul (body)"
    return "other ops"


def profile_decode(model, prompts, sampling, G, vocab, **kw) -> dict:
    """Self CPU time by group over one generate call (its prefill included: prefill_s says how much)."""
    from torch.profiler import ProfilerActivity, profile

    with labelled_sampling(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        out = generate(model, prompts, sampling, num_samples=G, generator=torch.Generator().manual_seed(0), **kw)
        wall = time.perf_counter() - t0
    groups = dict.fromkeys(PROFILE_GROUPS, 0.0)
    ops: dict = {}
    for ev in prof.events():
        if ev.device_type.name != "CPU" or ev.name == "rtpo.sample_tokens":
            continue
        g = classify(ev, vocab)
        groups[g] += ev.self_cpu_time_total / 1e6
        key = f"{g}: {ev.name}"
        ops[key] = ops.get(key, 0.0) + ev.self_cpu_time_total / 1e6
    groups["Python / framework"] = max(0.0, wall - sum(groups.values()))
    return {"wall_s": wall, "prefill_s": out.stats["prefill_s"], "decode_s": out.stats["decode_s"],
            "seconds": groups, "share": {k: v / wall for k, v in groups.items()},
            "top_ops_s": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:25]),
            "note": "whole generate call (prefill included: its share is prefill_s / wall_s); the profiler "
                    "adds its own per-op cost, which lands mostly in the Python / framework row"}


# ----------------------------------------------------------------------------- levers

@contextlib.contextmanager
def prefill_all_logits(model):
    """The prefill computes the LM head at every prompt position (logits_to_keep off)."""
    kw = gen._forward_kwargs(model)
    saved = dict(kw)
    kw.pop("logits_to_keep", None)
    try:
        yield
    finally:
        kw.clear()
        kw.update(saved)


@contextlib.contextmanager
def cpu_compile():
    """Let generate(compile=True) compile on CPU (rtpo.generation.COMPILE_DEVICES is CUDA-only)."""
    saved = gen.COMPILE_DEVICES
    gen.COMPILE_DEVICES = saved + ("cpu",)
    try:
        yield
    finally:
        gen.COMPILE_DEVICES = saved
        gen._COMPILED.pop("cpu", None)


_COMPILED_SAMPLER: dict = {}


@contextlib.contextmanager
def compiled_sampling():
    """rtpo.generation.sample_tokens through torch.compile (inductor fuses the softmax / cumsum / search
    into a few kernels): the sampling-fusion lever, without changing its arithmetic's order of operations."""
    orig = gen.sample_tokens
    if "fn" not in _COMPILED_SAMPLER:
        _COMPILED_SAMPLER["fn"] = torch.compile(orig, dynamic=True)
    gen.sample_tokens = _COMPILED_SAMPLER["fn"]
    try:
        yield
    finally:
        gen.sample_tokens = orig


LEVERS = {
    # name: (generate kwargs, context manager factory or None)
    "default": ({}, None),
    "no_compaction": ({"compact": False}, None),
    "static_cache": ({"cache": "static"}, None),
    "static_compiled": ({"cache": "static", "compile": True}, "cpu_compile"),
    "prefill_all_logits": ({}, "prefill_all_logits"),
    "compiled_sampling": ({}, "compiled_sampling"),
}


def _ctx(name, model):
    return {"cpu_compile": cpu_compile, "prefill_all_logits": lambda: prefill_all_logits(model),
            "compiled_sampling": compiled_sampling}.get(
        name, contextlib.nullcontext)()


# ----------------------------------------------------------------------------- main

def load(args, tmp):
    from rtpo.cli import parse_args
    from rtpo.trainer import Trainer

    argv = ["--preset", args.preset, "--rollout.prompts_per_step", str(args.prompts), "--G", str(args.G),
            "--rollout.max_new_tokens", str(args.new_tokens), "--eval.num_examples", "0", "--log.progress", "false",
            "--run.output_dir", tmp, "--run.num_threads", str(args.threads), "--run.device", args.device,
            "--run.dtype", "bfloat16" if args.device == "cuda" else "float32"]
    argv += ["--model", args.model] if args.model else []
    argv += list(args.extra)
    argv += (["--curriculum.schedule", "constant", "--curriculum.value", str(args.keep)] if args.keep > 0
             else ["--curriculum.schedule", "none"])
    return Trainer(parse_args(argv), log=lambda m: None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="smollm2")
    ap.add_argument("--model", default=None, help="model.name (default: the preset's)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--keep", type=float, default=0.0, help="fixed hint fraction of the prompts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cuda: bf16 weights, bf16 matmul peak, no profile "
                    "(benchmarks/gpu_check.sh)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each config (median)")
    ap.add_argument("--levers", default=",".join(LEVERS), help=f"configs A/B'd with real EOS ({', '.join(LEVERS)})")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--profile-tokens", type=int, default=32, help="new tokens of the profiled call (the profiler "
                    "keeps every op: a full-length call at 32 rows needs gigabytes)")
    ap.add_argument("--quick", action="store_true", help="1 repeat, 2 prompts x G 2, 8 new tokens (a smoke test)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_decode_roofline.json"))
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more trainer flags (last), e.g. a tiny "
                    "model: --extra --model.num_layers 1")
    a = ap.parse_args(argv)
    if a.quick:
        a.repeats, a.prompts, a.G, a.new_tokens = 1, 2, 2, 8
    levers = [x for x in a.levers.split(",") if x]
    unknown = set(levers) - set(LEVERS)
    if unknown:
        sys.exit(f"unknown lever(s) {sorted(unknown)}; known: {', '.join(LEVERS)}")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tr = load(a, tmp)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    run, model = tr.run, tr.run.model.eval()
    _, _, prompts = tr.sampler.step_prompts(0)
    prompts = [p.ids for p in prompts]
    c = tr.cfg.rollout
    real = SamplingConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                          eos_token_ids=run.eos_ids, pad_token_id=run.tok.pad_token_id)
    forced = SamplingConfig(**{**real.__dict__, "eos_token_ids": ()})
    G, shape = a.G, decode_shape(model)
    compute_dtype = run.amp_dtype or next(model.parameters()).dtype  # CUDA: bf16 autocast, as the sampler runs
    shape["bytes_per_value"] = torch.finfo(compute_dtype).bits // 8
    row_prompt_lens = [len(p) for p in prompts for _ in range(G)]

    def run_once(sampling, seed=0, **kw):
        torch.manual_seed(seed)
        with run.autocast():
            return generate(model, prompts, sampling, num_samples=G, generator=torch.Generator().manual_seed(seed),
                            tokenizer=run.tok, **kw)

    # 1. machine limits, then the forced-length decode, alternated (bandwidth, peak, decode) x repeats
    run_once(forced)  # warm-up
    bws, peaks, decodes = [], [], []
    for _ in range(a.repeats):
        bws.append(memory_bandwidth(device=device)["bytes_per_s"])
        peaks.append(matmul_peak(device, compute_dtype))
        o = run_once(forced)
        decodes.append(o.stats["decode_s"])
    bw, peak = max(bws), max(peaks)
    lengths = [len(x) for x in o.completions]
    roof = decode_roofline(shape, row_prompt_lens, lengths, bw, peak)
    dec = statistics.median(decodes)
    tokens = sum(lengths)
    headline = {"rows": len(lengths), "tokens": tokens, "decode_s": decodes, "decode_s_median": dec,
                "decode_tokens_per_s": tokens / dec, "roofline_s": roof["seconds"],
                "roofline_tokens_per_s": tokens / roof["seconds"], "efficiency": roof["seconds"] / dec,
                "achieved_flops": roof["flops"] / dec, "achieved_bytes_per_s": roof["bytes"] / dec,
                "memory_bandwidth_bytes_per_s": bw, "matmul_peak_flops": peak, "bandwidth_samples": bws,
                "peak_samples": peaks, "roofline": roof, "prefill_s": o.stats["prefill_s"]}
    print(f"decode, {len(lengths)} rows x {max(lengths)} tokens (forced length), {a.threads} thread(s): "
          f"{tokens / dec:.1f} tok/s; roofline {tokens / roof['seconds']:.1f} tok/s "
          f"({roof['memory_bound_steps']}/{roof['forwards']} steps memory-bound) -> {roof['seconds'] / dec:.1%}",
          flush=True)

    # 2. profile of the same call
    short = SamplingConfig(**{**forced.__dict__, "max_new_tokens": min(a.profile_tokens, a.new_tokens)})
    prof = (profile_decode(model, prompts, short, G, shape["vocab"], tokenizer=run.tok)
            if a.profile and device.type == "cpu" else None)

    # 3. levers with real EOS, interleaved
    results = {k: {"decode_s": [], "prefill_s": [], "wall_s": []} for k in levers}
    compile_s = None
    if "static_compiled" in levers:  # compile outside the timing (every batch size the run meets)
        t0 = time.perf_counter()
        with cpu_compile():
            try:
                run_once(real, **LEVERS["static_compiled"][0])
                run_once(real, **LEVERS["static_compiled"][0])
                compile_s = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 (report it: the lever is then absent from the table)
                print(f"static_compiled failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                levers.remove("static_compiled")
                results["static_compiled_error"] = f"{type(e).__name__}: {str(e)[:1000]}"
    for k in levers:  # warm-up
        with _ctx(LEVERS[k][1], model):
            run_once(real, **LEVERS[k][0])
    ref = None
    for rep in range(a.repeats):
        order = levers[rep % len(levers):] + levers[:rep % len(levers)]
        for k in order:
            kw, ctxname = LEVERS[k]
            with _ctx(ctxname, model):
                t0 = time.perf_counter()
                o = run_once(real, seed=rep, **kw)
                wall = time.perf_counter() - t0
            for f, v in (("decode_s", o.stats["decode_s"]), ("prefill_s", o.stats["prefill_s"]), ("wall_s", wall)):
                results[k][f].append(v)
            results[k]["tokens"] = o.stats["tokens_generated"]
            results[k]["compactions"] = o.stats["compactions"]
            results[k].setdefault("completions", []).append(o.completions)
    base = statistics.median(results["default"]["wall_s"]) if "default" in levers else None
    lever_rows = []
    first = results[levers[0]]["completions"]
    for k in levers:
        r = results[k]
        same = all(r["completions"][i] == first[i] for i in range(a.repeats))
        lens = [len(x) for x in r["completions"][0]]
        rf = decode_roofline(shape, row_prompt_lens, lens, bw, peak)
        wall, d = statistics.median(r["wall_s"]), statistics.median(r["decode_s"])
        lever_rows.append({"lever": k, "wall_s": wall, "decode_s": d, "prefill_s": statistics.median(r["prefill_s"]),
                           "tokens": r["tokens"], "tokens_per_s": r["tokens"] / wall, "compactions": r["compactions"],
                           "speedup_vs_default": base / wall if base else None,
                           "decode_efficiency": rf["seconds"] / d, "same_completions_as_first": same,
                           "wall_samples": r["wall_s"]})
    for k in levers:
        results[k].pop("completions")

    res = {"model": tr.cfg.model.name, "preset": a.preset, "threads": torch.get_num_threads(), "keep": a.keep,
           "device": str(device), "compute_dtype": str(compute_dtype),
           "prompts": a.prompts, "G": G, "max_new_tokens": a.new_tokens, "prompt_lens": [len(p) for p in prompts],
           "shape": shape, "headline_forced_length": headline, "profile": prof, "levers": lever_rows,
           "static_compiled_compile_s": compile_s, "lever_errors": {k: v for k, v in results.items() if "error" in k},
           "total_s": time.perf_counter() - t_start,
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
                       "torch": torch.__version__, "note": "bandwidth, peak and times vary by machine and load"}}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)

    g = 1e9
    print(f"\n## Decode vs roofline: {res['model']}, {a.prompts} prompts x G {G}, {a.new_tokens} new tokens, "
          f"{str(compute_dtype).replace('torch.', '')}, {device.type}, "
          f"{res['threads']} thread(s) (machine figures vary by machine and load)")
    h = headline
    print("| decode tok/s | roofline tok/s | efficiency | bandwidth GB/s | matmul peak GFLOP/s | "
          "achieved GFLOP/s | achieved GB/s | memory-bound steps |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {h['decode_tokens_per_s']:.1f} | {h['roofline_tokens_per_s']:.1f} | {h['efficiency']:.1%} | "
          f"{bw / g:.1f} | {peak / g:.1f} | {h['achieved_flops'] / g:.1f} | {h['achieved_bytes_per_s'] / g:.1f} | "
          f"{roof['memory_bound_steps']}/{roof['forwards']} |")
    if prof:
        print(f"\nprofile (share of one generate call, {prof['wall_s']:.2f} s, prefill {prof['prefill_s']:.2f} s):")
        print("| " + " | ".join(PROFILE_GROUPS) + " |")
        print("|" + "---|" * len(PROFILE_GROUPS))
        print("| " + " | ".join(f"{prof['share'][k]:.1%}" for k in PROFILE_GROUPS) + " |")
    print(f"\nlevers (real EOS, median of {a.repeats}, interleaved):")
    print("| lever | wall s | prefill s | decode s | tokens | tok/s | vs default | decode efficiency | same completions |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in lever_rows:
        vs = f"{r['speedup_vs_default']:.2f}x" if r["speedup_vs_default"] else ""
        print(f"| {r['lever']} | {r['wall_s']:.2f} | {r['prefill_s']:.3f} | {r['decode_s']:.2f} | {r['tokens']} | "
              f"{r['tokens_per_s']:.1f} | {vs} | {r['decode_efficiency']:.1%} | {r['same_completions_as_first']} |")
    if compile_s is not None:
        print(f"(static_compiled: {compile_s:.0f} s of compiling before timing)")
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
