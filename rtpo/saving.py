"""Checkpoint contents: what a checkpoint of a run holds, written and read back on every process.

    every process:     its backend's shards (ZeRO)
    the main process:  HF weights (or the LoRA adapter, and <run>/base_model once), tokenizer, image
                       processor, trainer_state.pt = the loop's state + optimizer / schedule + RNG + config

The folder itself is made atomic and verified by rtpo/checkpoint.py.
"""

from __future__ import annotations

import os

from rtpo import checkpoint as ckpt, lora
from rtpo.config import ConfigError
from rtpo.stages import TrainingError


class Checkpointer:
    """Saves and restores a run's checkpoints; holds the LoRA base still to be written (the first save)."""

    def __init__(self, run, backend, log=print):
        self.run, self.backend, self.comm, self.log = run, backend, backend.comm, log
        self.out = run.cfg.run.output_dir
        self.base_pending = run.base_pending if run.peft is not None else None

    def save(self, step: int, state: dict) -> str:
        """The checkpoint of `step` holding the loop's `state` (its path, on every process once in place)."""
        if not self.comm.is_main:
            self._write(None, state)
            return self.comm.broadcast(None)
        try:
            path = ckpt.save_checkpoint(self.out, step, lambda tmp: self._write(tmp, state),
                                        self.run.cfg.checkpoint.keep_last)
        except OSError as e:  # e.g. a full disk: the failed save removed its folder, older checkpoints are untouched
            older = ckpt.list_checkpoints(self.out)
            kept = f"the previous checkpoint {older[-1][1]} is intact" if older else "no checkpoint was written before"
            raise TrainingError(f"saving the checkpoint of step {step} failed: {e}; {kept}. Free space (or fix "
                                "the folder), then continue with --resume auto") from None
        self.log(f"[rtpo] checkpoint saved: {path}")
        return self.comm.broadcast(path)

    def _write(self, tmp, state: dict) -> None:
        """Every process: its backend's shards; the main process: HF weights, tokenizer, trainer_state.pt."""
        run = self.run
        tmp = self.comm.broadcast(tmp)  # the main process's temporary folder, from ckpt.save_checkpoint
        self.backend.save_shards(tmp)
        base = self.base_pending  # LoRA, once per run: the base its adapter names
        with self.backend.full_weights(trainable_only=run.peft is not None and base is None):  # same on every process
            if self.comm.is_main:
                if run.peft is None:
                    run.model.save_pretrained(tmp)
                else:
                    if base is not None:
                        lora.write_base(run.model, run.tok, os.path.join(self.out, lora.BASE_DIR), base)
                    lora.save_adapter(run.peft, tmp)
                run.tok.save_pretrained(tmp)
                if run.vision is not None:  # the image processor: rtpo.eval and resume read it back
                    run.vision.save_pretrained(tmp)
                ckpt.save_state(tmp, {"step": state["step"], **self.backend.state_dict(), **state,
                                      "rng": ckpt.rng_state(), "config": run.cfg.to_dict()})
        self.base_pending = None
        self.comm.barrier()  # every shard is written before the main process fsyncs and renames the folder

    def load(self, path: str) -> dict:
        """Restore the backend (shards, optimizer, schedule) and the RNG from checkpoint `path` -> the loop's
        state as saved."""
        try:
            st = ckpt.load_state(path)  # first: nothing else of the folder is unpickled if this file is unsafe
        except ckpt.CheckpointError as e:
            raise ConfigError(f"run.resume: {e}") from None
        self.backend.load_shards(path)  # before the schedule state below, which wins
        self.backend.load_state_dict(st)
        ckpt.set_rng_state(st["rng"])
        return st
