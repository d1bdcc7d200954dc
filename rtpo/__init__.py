"""rtpo: a standalone GRPO trainer with Reverse Thinking Policy Optimization (RTPO).

Modules, one idea each: config, data, synthetic, embedded, models, curriculum, generation, rewards,
advantages, losses, logprobs, checkpoint, metrics, warmstart, trainer.
"""

from rtpo.config import ConfigError, RTPOConfig, parse_args

__version__ = "0.1.0"
__all__ = ["RTPOConfig", "ConfigError", "parse_args", "__version__"]
