"""The update's achieved FLOP/s against the machine's measured matmul peak (model FLOPs utilisation).

One rollout of the trainer (SmolLM2-135M by default, where matmuls dominate), then `--reps` timed
calls of `Updater.update` on it. The optimizer step is timed apart (it is memory-bound, not matmul
work), so two utilisations are reported: forward + backward alone, and the whole update.

Useful FLOPs of one update (the usual MFU accounting; padding and recomputation are not counted):
    6 * N_body * tokens          decoder matmuls, forward + backward, for every token the pass encodes
  + 6 * H * V * completions      the LM head, evaluated at completion positions only
  + 12 * L * H_attn * sum(ctx)   attention scores and values, ctx = the positions each token attends to
`tokens` counts each prompt once per group when the update shares the prompt across its G
completions (the prompt share), once per row otherwise. N_body excludes the embedding matrix.

The peak is measured in the same process, at the same thread count and dtype, as the best of
square matmuls of several sizes (float32 on CPU, bfloat16 on CUDA): the rate this machine actually
reaches, not a datasheet number.

  python benchmarks/bench_update_flops.py [--model smollm2-135m] [--keep 1] [--reps 3]
  python benchmarks/bench_update_flops.py --device cuda      # bf16 autocast, GPU-sized rollout
"""

from __future__ import annotations

import argparse
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

from rtpo.cli import parse_args  # noqa: E402
from rtpo.trainer import Trainer  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes, reps: int = 5) -> dict:
    """Best FLOP/s of an [n, n] @ [n, n] matmul over `sizes` (2 n^3 FLOPs each)."""
    best, per = 0.0, {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        _sync(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            times.append(time.perf_counter() - t0)
        per[n] = 2 * n ** 3 / min(times)
        best = max(best, per[n])
    return {"flops": best, "per_size": per}


def model_shape(model) -> dict:
    """Parameter counts and the dimensions the FLOP model needs (a vision-language model's text decoder:
    its vision tower's FLOPs are not counted, so its utilisation is understated)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    emb = model.get_input_embeddings().weight
    vision = getattr(getattr(model, "model", model), "visual", None)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    total -= sum(p.numel() for p in vision.parameters()) if vision is not None else 0
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"params": total, "body_params": total - emb.numel(), "hidden": cfg.hidden_size,
            "vocab": emb.shape[0], "layers": cfg.num_hidden_layers, "attn_width": heads * head_dim}


def update_flops(shape: dict, prompts: list, completions: list, G: int, shared: bool) -> dict:
    """Useful FLOPs of one forward + backward over the rows (see the module docstring)."""
    P = sum(len(p) for p in prompts[::G]) if shared else sum(len(p) for p in prompts)
    C = sum(len(c) for c in completions)
    # attention context: a prompt token at position i sees i + 1 keys; a completion token at j sees len(p) + j + 1
    ctx_prompt = sum(n * (n + 1) // 2 for n in (len(p) for p in (prompts[::G] if shared else prompts)))
    ctx_comp = sum(len(c) * len(p) + len(c) * (len(c) + 1) // 2 for p, c in zip(prompts, completions))
    body = 6 * shape["body_params"] * (P + C)
    head = 6 * shape["hidden"] * shape["vocab"] * C
    attn = 12 * shape["layers"] * shape["attn_width"] * (ctx_prompt + ctx_comp)
    return {"prompt_tokens": P, "completion_tokens": C, "flops": body + head + attn,
            "flops_body": body, "flops_head": head, "flops_attention": attn}


def sharing(cfg) -> bool:
    """Whether the update encodes each prompt once per group (config knob, when the trainer has one)."""
    for section, key in (("optim", "share_prefix"), ("loss", "share_prompt"), ("optim", "share_prompt")):
        v = getattr(getattr(cfg, section), key, None)
        if v is not None:
            return bool(v)
    return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="smollm2", help="the trainer preset (e.g. shapes: the tiny VLM)")
    ap.add_argument("--model", default=None, help="model.name (default: the preset's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default 4 CPU, 32 CUDA)")
    ap.add_argument("--G", type=int, default=None, help="completions per prompt (default 4 CPU, 8 CUDA)")
    ap.add_argument("--new-tokens", type=int, default=None, help="max completion tokens (default 64 CPU, 128 CUDA)")
    ap.add_argument("--keep", type=float, default=1.0, help="fixed hint fraction of the prompts (1 = whole trace)")
    ap.add_argument("--micro-batch", type=int, default=None, help="optim.micro_batch_size (default: all rows)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = the trainer's choice)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more trainer flags, e.g. --extra --optim.share_prefix false")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    prompts, G = a.prompts or (32 if cuda else 4), a.G or (8 if cuda else 4)
    new = a.new_tokens or (128 if cuda else 64)
    out_path = a.out or os.path.join(ROOT, "benchmarks", "results", f"bench_update_flops_{a.preset}_{device.type}.json")

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--preset", a.preset, *(["--model", a.model] if a.model else []), "--run.device", a.device,
                "--rollout.prompts_per_step", str(prompts), "--G", str(G), "--rollout.max_new_tokens", str(new),
                "--optim.micro_batch_size", str(a.micro_batch or prompts * G), "--eval.num_examples", "0",
                "--log.progress", "false", "--run.output_dir", tmp, "--run.num_threads", str(a.threads),
                "--run.dtype", "bfloat16" if cuda else "float32"]
        argv += (["--curriculum.schedule", "constant", "--curriculum.value", str(a.keep)] if a.keep > 0
                 else ["--curriculum.schedule", "none"])
        cfg = parse_args(argv + list(a.extra))
        tr = Trainer(cfg, log=lambda m: None)
        ro = tr.sampler.rollout(0)
        sc = tr.scorer.score(ro)

        timers = {"optimizer": 0.0}
        step = tr.backend.step

        def timed_step(*args, **kw):  # the optimizer step (+ clipping), timed apart from forward/backward
            _sync(device)
            t0 = time.perf_counter()
            r = step(*args, **kw)
            _sync(device)
            timers["optimizer"] += time.perf_counter() - t0
            return r

        tr.backend.step = timed_step
        tr.updater.update(ro, sc)  # warm-up (allocations, kernel selection)
        walls, opts = [], []
        for _ in range(a.reps):
            timers["optimizer"] = 0.0
            _sync(device)
            t0 = time.perf_counter()
            tr.updater.update(ro, sc)
            _sync(device)
            walls.append(time.perf_counter() - t0)
            opts.append(timers["optimizer"])
        shape = model_shape(tr.run.model)
        shared = sharing(cfg)
        fl = update_flops(shape, ro.prompts, ro.completions, G, shared)
        fl["flops"] *= cfg.loss.num_iterations  # each pass over the rows is a forward + backward
        threads = torch.get_num_threads()
        dtype = torch.bfloat16 if cuda else torch.float32
        peak = matmul_peak(device, dtype, (4096, 8192) if cuda else (512, 1024, 2048))

    wall, opt = statistics.median(walls), statistics.median(opts)
    fb = wall - opt
    res = {
        "model": cfg.model.name, "preset": a.preset, "device": str(device), "dtype": str(dtype), "threads": threads, "keep": a.keep,
        "prompts": prompts, "G": G, "max_new_tokens": new, "prompt_shared_in_update": shared,
        "shape": shape, **fl, "update_seconds": walls, "optimizer_seconds": opts,
        "matmul_peak_flops": peak["flops"], "matmul_peak_per_size": {str(k): v for k, v in peak["per_size"].items()},
        "achieved_flops_fwd_bwd": fl["flops"] / fb, "achieved_flops_update": fl["flops"] / wall,
        "mfu_fwd_bwd": fl["flops"] / fb / peak["flops"], "mfu_update": fl["flops"] / wall / peak["flops"],
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
                    "gpu": torch.cuda.get_device_name(device) if cuda else None},
    }
    g = 1e9
    print(f"update FLOP/s on {cfg.model.name}, {device} {dtype}, {threads} thread(s), keep {a.keep}, "
          f"{prompts} prompts x G {G}, prompt {'shared' if shared else 'per row'}:")
    print(f"| tokens (prompt + completion) | GFLOP / update | update s | optimizer s | fwd+bwd GFLOP/s | "
          f"matmul peak GFLOP/s | MFU fwd+bwd | MFU update |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {fl['prompt_tokens']} + {fl['completion_tokens']} | {fl['flops'] / g:.1f} | {wall:.3f} | {opt:.3f} | "
          f"{res['achieved_flops_fwd_bwd'] / g:.1f} | {peak['flops'] / g:.1f} | {res['mfu_fwd_bwd']:.1%} | "
          f"{res['mfu_update']:.1%} |")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out_path}")
    return res


if __name__ == "__main__":
    main()
