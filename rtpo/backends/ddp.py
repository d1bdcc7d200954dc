"""torch DDP under torchrun: W processes train exactly like one process on the same batch.

Gradients are all-reduced (averaged) on the last micro batch of each update only; each process's
loss is its share of the global loss (the trainer's normalisers are summed over processes), so it
is scaled by W before backward to make the average the gradient of the global loss."""

from __future__ import annotations

import contextlib

import torch

from rtpo.backends.local import LocalBackend
from rtpo.comm import TorchComm
from rtpo.distributed import (LogprobModule, check_boundary, init_process_group, local_main_first,
                              local_rank, micro_batches_per_update, place, world_size)


class DDPBackend(LocalBackend):
    description = "DDP"

    def __init__(self, cfg):
        device = place(cfg, use_deepspeed=False)
        super().__init__(cfg, device)
        self.gas, self.local_rank = micro_batches_per_update(cfg, world_size()), local_rank()
        init_process_group(False, self.device.type)
        self.comm = TorchComm()
        self.micro_count = 0

    def main_first(self):
        return local_main_first(self.local_rank)

    def prepare(self, model, ref, lr_fn) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        super().prepare(model, ref, lr_fn)
        dev = next(model.parameters()).device
        kw = {"device_ids": [dev.index or 0]} if dev.type == "cuda" else {}
        self.ddp = DDP(LogprobModule(model, self.cfg.rollout.temperature), **kw)

    def logprobs(self, batch, ref=False, with_entropy=True):
        if ref or not torch.is_grad_enabled():
            return super().logprobs(batch, ref=ref, with_entropy=with_entropy)
        last = self.micro_count % self.gas == self.gas - 1  # all-reduce on the update's last micro batch
        with contextlib.nullcontext() if last else self.ddp.no_sync():
            return self.ddp(**batch, with_entropy=with_entropy)

    def backward(self, loss) -> None:
        (loss * self.comm.world).backward()
        self.micro_count += 1

    def step(self, loss_finite: bool) -> float:
        check_boundary(self.micro_count, self.gas)
        return super().step(loss_finite)

