"""The backend interface, and its one-process implementation (the reference the others equal)."""

from __future__ import annotations

import contextlib
import math
import os

import torch

from rtpo.checkpoint import DS_DIR, deepspeed_checkpoint_message
from rtpo.comm import Comm
from rtpo.config import ConfigError
from rtpo.device import auto_device, auto_dtype
from rtpo.logprobs import completion_logprobs, micro_batches, mini_batches
from rtpo.lora import AdaptersOff


class Backend:
    """What the Trainer asks of a parallel strategy.

    - `comm`: the processes (world, rank, gather/sum); `main_first()`: local rank 0 loads first.
    - `device` / `amp_dtype`: where this process computes and its autocast dtype (None: float32),
      decided once when the backend is built (rtpo.device); the config is never written back.
    - `gas`: micro batches per update when the strategy fixes it (DDP / DeepSpeed run collectives in
      every backward, so every process runs the same number), else None; `plan(n_rows, costs)`: the
      update's mini batches, each cut into micro batches.
    - `prepare(model, ref, lr_fn)`: build the optimizer (and engine) once the models exist.
    - `logprobs(batch, ref=False)`: per-token log-probs (and entropies) of the policy or the reference.
    - `backward(loss)` per micro batch; `step(loss_finite)` at the end of an update: the grad norm,
      NaN when the update was skipped (non-finite loss or gradients: nothing changed).
    - `generation()`: held around a phase of generation; `full_weights(trainable_only)`: around saving
      weights (all of them, or the trainable ones: a LoRA adapter).
    - `state_dict()` / `load_state_dict()`: optimizer and schedule state for trainer_state.pt;
      `save_shards(folder)` / `load_shards(folder)`: what a strategy keeps beside it (ZeRO shards).
    """

    comm: Comm
    scheduler: torch.optim.lr_scheduler.LRScheduler
    gas: int | None = None
    description: str | None = None  # named in the run's first log line (None: one process)

    def __init__(self, cfg, device: str | None = None):
        self.cfg = cfg
        self.comm = Comm()
        self.device = torch.device(device or auto_device(cfg.run.device))
        self.amp_dtype = auto_dtype(cfg.run.dtype, str(self.device))

    def plan(self, n_rows: int, costs) -> list:
        """The update's mini batches of a step's `n_rows` rows (optim.mini_batches consecutive slices), each
        cut into micro batches by rtpo.logprobs.micro_batches (`costs(rows)`: each row's tokens)."""
        o = self.cfg.optim
        return [micro_batches(mb, costs, o, self.gas) for mb in mini_batches(n_rows, o.mini_batches)]

    def main_first(self):
        return contextlib.nullcontext()

    def prepare(self, model, ref, lr_fn) -> None:
        raise NotImplementedError

    def logprobs(self, batch, ref=False, with_entropy=True):
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def backward(self, loss) -> None:
        raise NotImplementedError

    def step(self, loss_finite: bool) -> float:
        raise NotImplementedError

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def generation(self):
        return contextlib.nullcontext()

    def full_weights(self, trainable_only: bool = False):
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, st: dict) -> None:
        raise NotImplementedError

    def save_shards(self, folder) -> None:
        pass

    def load_shards(self, folder: str) -> None:
        pass


class LocalBackend(Backend):
    """One process: torch.optim.AdamW, gradients clipped to optim.max_grad_norm."""

    def prepare(self, model, ref, lr_fn) -> None:
        o = self.cfg.optim
        self.model, self.ref = model, ref
        # trainable parameters only: with LoRA the frozen base holds no optimizer state
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_fn)

    def logprobs(self, batch, ref=False, with_entropy=True):
        if ref and isinstance(self.ref, AdaptersOff):  # LoRA: the reference is the policy with adapters off
            with self.ref.off():
                return completion_logprobs(self.model, batch, self.cfg.rollout.temperature, with_entropy=with_entropy)
        return completion_logprobs(self.ref if ref else self.model, batch, self.cfg.rollout.temperature,
                                   with_entropy=with_entropy)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self, loss_finite: bool) -> float:
        mgn = self.cfg.optim.max_grad_norm
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, mgn if mgn > 0 else float("inf")))
        if loss_finite and math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.zero_grad()
        return norm

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, st: dict) -> None:
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])

    def load_shards(self, path: str) -> None:
        if os.path.isdir(os.path.join(path, DS_DIR)):
            raise ConfigError(deepspeed_checkpoint_message(path))
