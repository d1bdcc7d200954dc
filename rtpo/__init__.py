"""rtpo: a standalone GRPO trainer with Reverse Thinking Policy Optimization (RTPO).

Modules, one idea each: config, cli, presets, data, synthetic, embedded, models, curriculum, prompts,
generation, rewards, advantages, losses, logprobs, stages, comm, checkpoint, metrics, warmstart, trainer.
"""

from rtpo.config import ConfigError, RTPOConfig
from rtpo.cli import parse_args

__version__ = "0.1.0"
__all__ = ["RTPOConfig", "ConfigError", "parse_args", "__version__"]
