"""Named bundles of config values (`--preset NAME`), applied before --config and --key overrides."""

from __future__ import annotations

from rtpo.config import ConfigError, apply_dict

PRESETS = {
    # the default: the embedded tiny model on the embedded arithmetic task
    "embedded": {},
    # plain GRPO on the same setup: no hint at any step
    "grpo": {"curriculum.schedule": "none"},
    # GSM8K with a hub instruct model (needs a network)
    "gsm8k": {
        "model.name": "Qwen/Qwen2.5-0.5B-Instruct", "data.dataset": "openai/gsm8k", "data.subset": "main",
        "data.format": "gsm8k", "data.eval_split": "test", "data.num_eval": 256,
        "data.system_prompt": "Think step by step inside <think> </think>, then give the final number.",
        "rollout.max_new_tokens": 384, "rollout.prompts_per_step": 16, "eval.max_new_tokens": 512,
        "optim.lr": 1e-6, "optim.micro_batch_size": 8, "warmstart.enabled": "false", "run.max_steps": 500,
    },
}


def apply_preset(cfg, name):
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is unknown; presets: {', '.join(sorted(PRESETS))}")
    return apply_dict(cfg, PRESETS[name], source=f"preset {name}")
