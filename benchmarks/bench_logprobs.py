"""Peak memory and time of per-token log-probs + entropy, forward + backward: naive vs chunked (vs Triton).

What one measurement is: hidden [N, H] and lm_head weight [V, H] (both requiring grad, no bias, as in
Qwen2), targets [N]; run `logp, ent = linear_logprobs(...)` and `autograd.grad` of
sum(g1 * logp + g2 * ent) w.r.t. (hidden, weight), i.e. what a GRPO step with an entropy bonus does.
The [V, H] float32 weight gradient is part of every impl's peak (it is an output, not overhead).

    python benchmarks/bench_logprobs.py            # GPU sizes on CUDA, else the CPU variant
    python benchmarks/bench_logprobs.py --cpu      # CPU variant (< 2 min on 2 cores)

GPU: V in {32k, 151k} x N in {4k, 16k}, H = 896, bf16 inputs; impls naive / torch / triton; time =
median of --reps runs after a full-size warm-up (CUDA-synchronised); peak = torch.cuda.max_memory_allocated
during the timed runs minus memory allocated before them (the inputs).
CPU: V in {32k, 151k} x N in {512, 1024}, H = 128 (a smaller H keeps the run short; the [N, V] terms
the kernels remove do not depend on H), fp32 inputs; impls naive / torch with the library's default
CPU blocks (BLOCK_ELEMENTS_CPU = 4M logits, 16 MiB per block) / torch with a 4096-entry vocab block.
Each (case, impl) runs in a fresh subprocess after a tiny warm-up (thread pools); peak = RSS high-water
mark (VmHWM, reset via /proc/self/clear_refs just before the timed run) minus the RSS at that moment
(inputs allocated). Big CPU buffers are mmap'd and unmapped on free, so RSS tracks live tensors; small
ones may stay in malloc's heap, which can only over-count. Without /proc, ru_maxrss is used instead.
CPU workers use 1 torch thread by default (--threads): on a small shared box, a 2-thread OpenMP region
stalls ~10 ms at its barrier whenever another process holds a core, which penalises many small ops
(small blocks) arbitrarily. CPU times are single runs (--reps) and noisy on a shared machine.

Table: time ms, peak MB, and both as a ratio to naive. Issue targets at V = 151k: peak <= 1/8 of naive,
time <= 1.2x naive. JSON goes to --out (default benchmarks/results/bench_logprobs.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kernels import linear_logprobs  # noqa: E402
from kernels.logprobs import BLOCK_ELEMENTS, BLOCK_ELEMENTS_CPU, block_shape, chunked_core  # noqa: E402

# impls: (impl, vocab_chunk_size); None = the library default block shape (what linear_logprobs uses)
GPU = dict(Vs=(32_000, 151_936), Ns=(4096, 16384), H=896, dtype="bfloat16",
           impls=(("naive", None), ("torch", None), ("triton", None)), reps=5)
CPU = dict(Vs=(32_000, 151_936), Ns=(512, 1024), H=128, dtype="float32",
           impls=(("naive", None), ("torch", None), ("torch", 4096)), reps=1)


def make_problem(N, V, H, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).mul_(3.0 / H ** 0.5).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    g1, g2 = torch.randn(2, N, generator=g).to(device)
    return hidden, weight, targets, g1, g2


def step(impl, vchunk, hidden, weight, targets, g1, g2):
    """One forward + backward; returns nothing (grads are dropped so nothing accumulates)."""
    if vchunk is None:
        logp, ent = linear_logprobs(hidden, weight, targets, impl=impl)
    else:   # same core as linear_logprobs(impl="torch"), with an explicit vocab block
        logp, ent = chunked_core(hidden, weight, targets, None, 1.0, True, vocab_chunk_size=vchunk)
    grads = torch.autograd.grad((g1 * logp + g2 * ent).sum(), (hidden, weight))
    del logp, ent, grads


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_baseline():
    """Start a CPU peak measurement. Linux: reset the RSS high-water mark (write 5 to /proc/self/clear_refs)
    and return the current RSS, so temporaries freed before this point cannot hide in the baseline.
    Elsewhere: fall back to ru_maxrss (a high-water mark, so the baseline may over-count)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM", _proc_status_kb("VmRSS") * 1024
    except OSError:
        return "ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_peak(kind):
    if kind == "VmHWM":
        return _proc_status_kb("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(impl, vchunk, N, V, H, dtype, device, reps):
    """time (ms, median of reps) and peak extra memory (MB) of forward + backward."""
    dt = getattr(torch, dtype)
    prob = make_problem(N, V, H, dt, device)
    if device == "cuda":
        step(impl, vchunk, *prob)                             # full-size warm-up: Triton compile, cuBLAS
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        step(impl, vchunk, *make_problem(16, 1000, H, dt, device, seed=1))   # tiny warm-up: thread pools
        kind, base = rss_baseline()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(impl, vchunk, *prob)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else rss_peak(kind) - base
    return statistics.median(times), peak / 2**20


def run_case(impl, vchunk, N, V, H, dtype, device, reps, threads=1):
    """GPU: in process (peak stats reset per case). CPU: fresh subprocess, so RSS high-water marks don't mix."""
    row = dict(V=V, N=N, H=H, dtype=dtype, impl=impl,
               block=list(block_shape(N, V, None, vchunk, BLOCK_ELEMENTS if device == "cuda" else BLOCK_ELEMENTS_CPU))
               if impl != "naive" else None,
               time_ms=None, peak_mb=None, error=None)
    if device == "cuda":
        try:
            row["time_ms"], row["peak_mb"] = measure(impl, vchunk, N, V, H, dtype, device, reps)
        except torch.cuda.OutOfMemoryError as exc:
            row["error"] = f"OOM: {str(exc).splitlines()[0]}"
        except Exception as exc:  # noqa: BLE001 - keep benchmarking the other cases, report this one
            row["error"] = repr(exc)
        torch.cuda.empty_cache()
        return row
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--worker",
           json.dumps([impl, vchunk, N, V, H, dtype, reps])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        row["error"] = f"worker rc={proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    else:
        row["time_ms"], row["peak_mb"] = json.loads(lines[-1][len("RESULT "):])
    return row


def add_ratios(rows):
    """time / naive time and peak / naive peak for the same (V, N)."""
    naive = {(r["V"], r["N"]): r for r in rows if r["impl"] == "naive" and r["error"] is None}
    for r in rows:
        n = naive.get((r["V"], r["N"]))
        ok = n is not None and r["error"] is None
        r["time_vs_naive"] = r["time_ms"] / n["time_ms"] if ok else None
        r["mem_vs_naive"] = r["peak_mb"] / n["peak_mb"] if ok and n["peak_mb"] > 0 else None


def fmt(x, spec):
    return format(x, spec) if x is not None else "-"


def print_table(rows):
    hdr = (f"{'case':<24} {'impl':<7} {'block CxVc':>12} {'time ms':>10} {'peak MB':>10} "
           f"{'time/naive':>11} {'mem/naive':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        case = f"V={r['V']} N={r['N']} H={r['H']}"
        block = "x".join(map(str, r["block"])) if r["block"] else "-"
        print(f"{case:<24} {r['impl']:<7} {block:>12} {fmt(r['time_ms'], '.1f'):>10} "
              f"{fmt(r['peak_mb'], '.1f'):>10} {fmt(r['time_vs_naive'], '.2f'):>11} {fmt(r['mem_vs_naive'], '.3f'):>10}"
              + (f"   {r['error']}" if r["error"] else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="CPU-sized variant (automatic without CUDA)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_logprobs.json"))
    ap.add_argument("--reps", type=int, default=None, help="timed runs per case (median reported)")
    ap.add_argument("--H", type=int, default=None, help="hidden size (default 896 GPU, 128 CPU)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU: torch threads per worker (default 1; see the module docstring)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker is not None:        # one CPU measurement in this fresh process
        impl, vchunk, N, V, H, dtype, reps = json.loads(args.worker)
        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(measure(impl, vchunk, N, V, H, dtype, "cpu", reps)), flush=True)
        return

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    cfg = GPU if device == "cuda" else CPU
    H, reps = args.H or cfg["H"], args.reps or cfg["reps"]
    impls = list(cfg["impls"])
    if device == "cuda":
        from kernels import triton_available
        if not triton_available():
            impls = [(i, c) for i, c in impls if i != "triton"]
    dev_name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    threads = torch.get_num_threads() if device == "cuda" else args.threads
    print(f"device={device} ({dev_name}), cpu threads={threads}, torch={torch.__version__}, "
          f"H={H}, dtype={cfg['dtype']}, reps={reps}")
    t_start = time.perf_counter()
    rows = []
    for V in cfg["Vs"]:
        for N in cfg["Ns"]:
            for impl, vchunk in impls:
                rows.append(run_case(impl, vchunk, N, V, H, cfg["dtype"], device, reps, args.threads))
                print(f"  measured V={V} N={N} {impl} vocab_chunk={vchunk or 'default'}: "
                      f"{fmt(rows[-1]['time_ms'], '.1f')} ms, {fmt(rows[-1]['peak_mb'], '.1f')} MB", flush=True)
    add_ratios(rows)
    print()
    print_table(rows)
    targets = [r for r in rows if r["V"] == max(cfg["Vs"]) and r["impl"] != "naive" and r["error"] is None]
    print(f"\nissue targets at V={max(cfg['Vs'])}: peak <= 1/8 naive (0.125), time <= 1.2x naive")
    for r in targets:
        print(f"  N={r['N']} {r['impl']} block={r['block']}: mem {fmt(r['mem_vs_naive'], '.3f')} "
              f"({'ok' if (r['mem_vs_naive'] or 9) <= 0.125 else 'MISSED'}), time {fmt(r['time_vs_naive'], '.2f')}x "
              f"({'ok' if (r['time_vs_naive'] or 9) <= 1.2 else 'MISSED'})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=device, device_name=dev_name, torch=torch.__version__, threads=threads,
                       H=H, dtype=cfg["dtype"], reps=reps, wall_s=time.perf_counter() - t_start,
                       method=("cuda max_memory_allocated minus allocated before the timed runs" if device == "cuda"
                               else "fresh subprocess per case: RSS high-water mark (VmHWM, reset via "
                                    "/proc/self/clear_refs after inputs + tiny warm-up) minus RSS at that reset"),
                       results=rows), f, indent=1)
    print(f"\nwrote {args.out} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
