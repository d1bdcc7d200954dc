"""DeepSpeed ZeRO (stages 1-3, CPU offload): W processes train exactly like one process.

The engine owns gradients, optimizer state and the accumulation boundary: `backward` also calls
engine.step(), which updates (clipping, skipping non-finite steps) on the update's last micro batch
only. Each process's loss is its share of the global loss, scaled by W since DeepSpeed averages.
ZeRO-3: parameters are gathered once per generation phase (rtpo.distributed.gathered_for_generation)
and for saving the HF weights; the reference model gets its own inference engine. Checkpoints: the
ZeRO shards of every process go under `deepspeed/` of the checkpoint folder."""

from __future__ import annotations

import contextlib
import logging
import os
import re

import torch

from rtpo.backends.local import Backend
from rtpo.checkpoint import DS_DIR, CheckpointError, check_deepspeed_shards
from rtpo.comm import TorchComm
from rtpo.config import ConfigError
from rtpo.distributed import (DS_TAG, LogprobModule, check_boundary, ds_amp_dtype,
                              ensure_launch_env, gathered_for_generation, hidden_size, init_process_group,
                              load_ds_config, local_main_first, local_rank,
                              micro_batches_per_update, place, reference_ds_config, resolve_ds_config,
                              world_size, zero_stage)
from rtpo.logprobs import completion_logprobs
from rtpo.lora import AdaptersOff


class DeepSpeedBackend(Backend):
    def __init__(self, cfg):
        self.ds_raw = load_ds_config(cfg.run.deepspeed)
        ensure_launch_env()
        self.world = world_size()
        self.gas, self.local_rank = micro_batches_per_update(cfg, self.world), local_rank()
        super().__init__(cfg, place(cfg, use_deepspeed=True))  # before importing DeepSpeed: it picks its accelerator then
        try:  # fail on a bad config before loading anything
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"run.deepspeed = {cfg.run.deepspeed!r} but DeepSpeed cannot be imported ({e}): "
                              "pip install deepspeed, or drop --run.deepspeed (under torchrun rtpo then trains "
                              "with DDP)") from None
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.stage = zero_stage(self.ds_raw)
        self.description = f"DeepSpeed ZeRO-{self.stage}"
        resolved = resolve_ds_config(self.ds_raw, cfg, self.world, source=cfg.run.deepspeed, device=str(self.device))
        self.amp_dtype = ds_amp_dtype(resolved, cfg, str(self.device))  # an explicit DeepSpeed bf16 / fp16 wins
        init_process_group(True, self.device.type)
        self.comm = TorchComm()
        self.ref_engine = None
        self.micro_count = 0

    def main_first(self):
        return local_main_first(self.local_rank)

    def prepare(self, model, ref, lr_fn) -> None:
        import deepspeed

        self.model, self.ref = model, ref
        self.ds_config = resolve_ds_config(self.ds_raw, self.cfg, self.world, hidden_size=hidden_size(model),
                                           source=self.cfg.run.deepspeed, device=str(self.device))
        module = self._logprob_module(model)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
            config=self.ds_config, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn))
        if ref is not None and self.stage == 3 and not isinstance(ref, AdaptersOff):
            self.ref_engine = deepspeed.initialize(model=self._logprob_module(ref),
                                                   config=reference_ds_config(self.ds_config))[0]
            self.ref_engine.eval()

    def _logprob_module(self, lm):
        module = LogprobModule(lm, self.cfg.rollout.temperature)
        head = lm.get_output_embeddings()
        if self.stage == 3 and head is not None:
            import deepspeed

            # The fused log-prob kernel reads the head weight outside the head's own forward: ZeRO-3 then
            # fetches it with this module (DeepSpeed would otherwise detect the access on the fly).
            deepspeed.zero.register_external_parameter(module, head.weight)
        return module

    def logprobs(self, batch, ref=False, with_entropy=True):
        if ref and isinstance(self.ref, AdaptersOff):  # LoRA: the policy's engine with its adapters off
            with self.ref.off():
                return self.engine(**batch, with_entropy=with_entropy)
        engine = self.ref_engine if ref else self.engine
        if engine is None:
            return completion_logprobs(self.ref, batch, self.cfg.rollout.temperature, with_entropy=with_entropy)
        return engine(**batch, with_entropy=with_entropy)

    def zero_grad(self) -> None:
        pass  # the engine zeroes its gradients at each update (engine.step)

    def backward(self, loss) -> None:
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        self.engine.step()  # updates (clipping, skipping non-finite steps) at the accumulation boundary only
        self.micro_count += 1

    def step(self, loss_finite: bool) -> float:
        check_boundary(self.micro_count, self.gas)
        if not self.engine.was_step_applied():  # DeepSpeed found non-finite gradients on some process
            return float("nan")
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0  # None: the user turned off compute_grad_norm

    @contextlib.contextmanager
    def generation(self):
        if self.stage == 3:
            with gathered_for_generation(self.engine):
                yield
        else:
            yield

    @contextlib.contextmanager
    def full_weights(self, trainable_only: bool = False):
        if self.stage == 3:
            import deepspeed

            # trainable_only (a LoRA adapter): the frozen base stays partitioned, not gathered on every save
            params = [p for p in self.model.parameters() if p.requires_grad or not trainable_only]
            with deepspeed.zero.GatheredParameters(params):
                yield
        else:
            yield

    def state_dict(self) -> dict:
        return {"optimizer": {"in": DS_DIR}, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, st: dict) -> None:
        self.scheduler.load_state_dict(st["scheduler"])  # the optimizer's state came with the shards

    def save_shards(self, folder) -> None:
        # LoRA: the frozen base is not written into every checkpoint (it is reloaded from base_model/ or its source)
        self.engine.save_checkpoint(os.path.join(folder, DS_DIR), tag=DS_TAG, save_latest=False,
                                    exclude_frozen_parameters=self.cfg.model.lora.r > 0)

    def load_shards(self, path: str) -> None:
        if not os.path.isdir(os.path.join(path, DS_DIR)):
            raise ConfigError(f"run.resume: {path} was written without DeepSpeed (no {DS_DIR}/ folder); resume it "
                              f"without --run.deepspeed, or start a new run from its weights with --model {path}")
        saved_world = len({m.group(1) for f in os.listdir(os.path.join(path, DS_DIR, DS_TAG))
                           for m in [re.search(r"zero_pp_rank_(\d+)_", f)] if m})
        if saved_world and saved_world != self.world:
            raise ConfigError(f"run.resume: {path} holds the ZeRO optimizer state of {saved_world} processes, this "
                              f"run has {self.world}; resume with {saved_world} processes (DeepSpeed cannot "
                              "re-partition it; its universal-checkpoint tools can convert it), or start a new run "
                              f"from its weights with --model {path}")
        try:
            check_deepspeed_shards(os.path.join(path, DS_DIR))  # DeepSpeed unpickles them without weights_only
        except CheckpointError as e:
            raise ConfigError(f"run.resume: {e}") from None
        loaded, _ = self.engine.load_checkpoint(os.path.join(path, DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=True,
                                                load_module_strict=self.cfg.model.lora.r == 0)  # LoRA: no frozen base
        if loaded is None:
            raise ConfigError(f"run.resume: DeepSpeed could not load {os.path.join(path, DS_DIR)}")
