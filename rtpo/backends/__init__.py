"""Parallel backends: how the policy is placed, run forward, stepped and saved.

The Trainer's loop asks its backend; it is never patched from outside. One interface (`Backend`,
implemented for one process in local.py), one file per strategy:

    local.py       LocalBackend      one process, torch.optim.AdamW
    ddp.py         DDPBackend        torch DDP under torchrun (no DeepSpeed config)
    zero.py        DeepSpeedBackend  DeepSpeed ZeRO stage 1-3, CPU offload

`make_backend(cfg)` picks one; a one-process run without DeepSpeed imports nothing distributed.
"""

from __future__ import annotations

import os

from rtpo.backends.local import Backend, LocalBackend

__all__ = ["Backend", "LocalBackend", "make_backend", "is_parallel"]


def is_parallel(cfg) -> bool:
    """DeepSpeed was asked for, or a launcher started more than one process."""
    return bool(cfg.run.deepspeed) or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def make_backend(cfg) -> Backend:
    """DeepSpeed when run.deepspeed is set, DDP under a multi-process launcher, else one process.
    Runs before the Trainer: it may place this process on its GPU (cfg.run.device) and start the
    process group."""
    if cfg.run.deepspeed:
        from rtpo.backends.zero import DeepSpeedBackend

        return DeepSpeedBackend(cfg)
    if is_parallel(cfg):
        from rtpo.backends.ddp import DDPBackend

        return DDPBackend(cfg)
    return LocalBackend(cfg)
