"""rtpo: a standalone GRPO trainer with Reverse Thinking Policy Optimization (RTPO).

Modules, one idea each: config, cli, presets, device, data, synthetic, wordproblems, shapes, embedded,
embedded_vl, models, vision, lora, export, curriculum, prompts, generation, rewards, advantages, losses,
logprobs, kernels (top-level package), stages, comm, backends, distributed, checkpoint, runlock, metrics,
warmstart, eval; the loop: run (setup, once), sampling, scoring, update, evaluation, saving, trainer.
"""

from rtpo.config import ConfigError, RTPOConfig
from rtpo.cli import parse_args

__version__ = "0.1.0"
__all__ = ["RTPOConfig", "ConfigError", "parse_args", "__version__"]
