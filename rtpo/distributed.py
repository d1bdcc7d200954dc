"""Data-parallel training: DeepSpeed ZeRO (stages 1-3, CPU offload) or, without a DeepSpeed config,
torch DDP under torchrun. The single-process Trainer stays the reference; this subclass only
changes what must change so that W processes train exactly like one process on the same batch:

- sharding: each process takes a contiguous 1/W of the step's prompts with all G completions of
  each, so group statistics never cross processes. Rewards are all-gathered before advantages, so
  `scale_rewards = batch` uses the whole batch's std too.
- sampling: every process draws the step's full uniform table from the shared generator and samples
  its columns (rtpo.generation.draw_uniforms), so a process's completions are the ones a single
  process would sample for those rows, and the generator state stays identical everywhere.
- loss: the normalisers (tokens, sequences) are summed over processes; DeepSpeed and DDP average
  gradients over the W processes, so each process's loss is multiplied by W before backward.
- ZeRO-3 generation: parameters are gathered once per rollout / evaluation phase and the ZeRO
  hooks are lifted meanwhile, so decoding does not all-gather every layer for every token. The
  price: during generation each GPU holds a full copy of the (16-bit) weights.
- metrics are reduced over processes; only rank 0 writes metrics.jsonl, config.json, the plot,
  the summary and the progress bar, and only rank 0 holds the run folder's lock (rtpo/runlock.py).
  Evaluation is sharded over processes and the means are combined weighted by example counts.
- checkpoints: rank 0 writes the usual folder (HF weights, tokenizer, trainer_state.pt); with
  DeepSpeed every process adds its ZeRO shards under `deepspeed/` before the atomic rename, and
  `--resume` restores them (same world size and ZeRO stage).

RNG states are the same on every process by construction (same seeds, same draws), so rank 0's
trainer_state.pt restores all of them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile

import numpy as np
import torch
import torch.distributed as dist

from rtpo import checkpoint as ckpt
from rtpo.config import ConfigError, RTPOConfig
from rtpo.comm import TorchComm
from rtpo.logprobs import completion_logprobs
from rtpo.trainer import Trainer

AUTO = "auto"
DS_DIR = "deepspeed"  # ZeRO shards inside a checkpoint folder
DS_TAG = "state"


# ----------------------------------------------------------------------------- world / rank

def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main_process() -> bool:
    return rank() == 0


def strip_launcher_args(argv: list) -> list:
    """The `deepspeed` launcher appends --local_rank=N to the script's arguments; the rank is in the
    environment too (LOCAL_RANK), so drop the flag instead of failing on an unknown config key."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
            continue
        if a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(a)
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launch_env() -> None:
    """Without a launcher DeepSpeed looks for MPI (mpi4py) to learn its rank; a plain
    `python train.py --deepspeed cfg.json` is one process, so say so in the environment."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _skip_cpu_shm_op() -> None:
    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (about a minute, once per
    # machine) when its comm backend starts. gloo's all-reduce is plenty for CPU runs, so report the op
    # as unavailable; RTPO_DS_CPU_SHM=1 keeps it.
    if os.environ.get("RTPO_DS_CPU_SHM") == "1":
        return
    try:
        import deepspeed.ops as ops

        ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # another DeepSpeed version: it just builds the op
        pass


def init_process_group(use_deepspeed: bool, device_type: str) -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if use_deepspeed:
        import deepspeed

        if device_type == "cpu":
            _skip_cpu_shm_op()
        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend)


def shutdown() -> None:
    """Tear the process group down explicitly: a ZeRO-3 process that exits with it alive aborts.
    No barrier first: after an error on one process the others may sit in another collective, and
    that process must exit (the launcher then stops the rest) rather than wait for them."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def _local_main_first(local_rank_: int):
    """Local rank 0 loads first (downloads, warm-start cache), the others then hit the caches."""
    if local_rank_ != 0:
        dist.barrier()
    try:
        yield
    finally:
        if local_rank_ == 0:
            dist.barrier()


# ----------------------------------------------------------------------------- DeepSpeed config

def load_ds_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"run.deepspeed = {path!r}: no such file (the shipped configs are ds_configs/zero1.json, "
                          "zero2.json, zero3.json, zero3_offload.json)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"run.deepspeed = {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"run.deepspeed = {path!r}: expected a JSON object at the top level")
    return data


def zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def micro_batches_per_update(cfg: RTPOConfig, world: int) -> int:
    """Micro batches each process accumulates per optimizer update: DeepSpeed's
    gradient_accumulation_steps. Also checks that the step's prompts split evenly over processes."""
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.num_generations
    M, m = cfg.optim.mini_batches, cfg.optim.micro_batch_size
    if P % world:
        raise ConfigError(f"rollout.prompts_per_step = {P} does not split over {world} processes: each process "
                          f"trains on whole prompts (all G completions of a prompt on one process, so that group "
                          f"advantages are exact); use a multiple of {world}")
    rows = P // world * G
    counts = sorted({math.ceil(len(s) / m) for s in np.array_split(np.arange(rows), M) if len(s)})
    if len(counts) > 1:
        raise ConfigError(f"optim.mini_batches = {M} splits each process's {rows} rollout rows into mini batches of "
                          f"{counts} micro batches (optim.micro_batch_size = {m}); DeepSpeed needs one "
                          f"gradient_accumulation_steps: pick mini_batches and micro_batch_size so that every mini "
                          f"batch has the same number of micro batches (e.g. mini_batches dividing {rows})")
    return counts[0]


def _ds_dtype(cfg: RTPOConfig, ds: dict, source: str):
    """(bf16, fp16) for DeepSpeed from run.dtype; with run.dtype auto an explicit DeepSpeed setting wins."""
    want = {"float32": (False, False), "bfloat16": (True, False), "float16": (False, True)}.get(cfg.run.dtype)
    given = [(ds.get(k) or {}).get("enabled", AUTO) if isinstance(ds.get(k), dict) else AUTO for k in ("bf16", "fp16")]
    if want is None:  # run.dtype auto
        if given[0] is True or given[1] is True:
            return given[0] is True, given[1] is True
        on_gpu = cfg.run.device.startswith("cuda") or (cfg.run.device == "auto" and torch.cuda.is_available())
        return (on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()), False
    for name, g, w in zip(("bf16", "fp16"), given, want):
        if g != AUTO and bool(g) != w:
            raise ConfigError(f"{source}: {name}.enabled = {json.dumps(g)} but run.dtype = {cfg.run.dtype!r}; make "
                              f"them agree, or write \"auto\" in the DeepSpeed config")
    return want


def resolve_ds_config(ds: dict, cfg: RTPOConfig, world: int, hidden_size: int | None = None,
                      source: str = "DeepSpeed config") -> dict:
    """A copy of `ds` with every "auto" filled from the rtpo config, so the two never disagree;
    a value given explicitly that differs from the rtpo config is an error naming both.
    May set cfg.run.dtype when it is "auto" and the DeepSpeed config enables bf16/fp16."""
    out = copy.deepcopy(ds)
    stage = zero_stage(out)
    if stage not in (1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage = {stage}; rtpo runs DeepSpeed with ZeRO stage 1, 2 or 3 "
                          "(stage 0 skips no update with non-finite gradients in fp32); for plain data parallelism "
                          "run torchrun without --run.deepspeed (DDP)")
    if "scheduler" in out:
        raise ConfigError(f"{source}: has a \"scheduler\" section, but the learning-rate schedule comes from "
                          "optim.lr_schedule / optim.lr_warmup_steps; remove \"scheduler\" from the DeepSpeed config")

    def settle(path: tuple, want, rtpo_key: str):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        k = path[-1]
        if node.get(k, AUTO) == AUTO:
            node[k] = want
            return
        have = node[k]
        same = (list(have) == list(want)) if isinstance(want, (list, tuple)) and isinstance(have, (list, tuple)) \
            else (not isinstance(have, bool) and isinstance(have, (int, float)) and have == want)
        if not same:
            raise ConfigError(f"{source}: {'.'.join(path)} = {json.dumps(have)} but {rtpo_key} = {json.dumps(want)}; "
                              "make them equal, or write \"auto\" in the DeepSpeed config")

    o = cfg.optim
    gas = micro_batches_per_update(cfg, world)
    settle(("train_micro_batch_size_per_gpu",), o.micro_batch_size, "optim.micro_batch_size")
    settle(("gradient_accumulation_steps",), gas,
           f"the rtpo config (micro batches per update per process: rollout.prompts_per_step "
           f"{cfg.rollout.prompts_per_step} / {world} processes x rollout.num_generations {cfg.rollout.num_generations}"
           f" rows in optim.mini_batches {o.mini_batches}, optim.micro_batch_size {o.micro_batch_size})")
    settle(("train_batch_size",), o.micro_batch_size * gas * world,
           "optim.micro_batch_size x gradient_accumulation_steps x processes")
    settle(("gradient_clipping",), float(o.max_grad_norm), "optim.max_grad_norm")

    bf16, fp16 = _ds_dtype(cfg, out, source)
    for name, on in (("bf16", bf16), ("fp16", fp16)):
        node = out.get(name)
        if not isinstance(node, dict):
            node = out[name] = {}
        node["enabled"] = on
    if cfg.run.dtype == "auto" and (bf16 or fp16):
        cfg.run.dtype = "bfloat16" if bf16 else "float16"

    zo = out.setdefault("zero_optimization", {})
    offload_opt = (zo.get("offload_optimizer") or {}).get("device", "none") not in (None, "none")
    opt = out.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adam", "adamw"):
        raise ConfigError(f"{source}: optimizer.type = {json.dumps(opt.get('type'))}; rtpo trains with AdamW "
                          "(optim.lr, optim.beta1/beta2, optim.eps, optim.weight_decay): use \"AdamW\"")
    params = opt.setdefault("params", {})
    if "torch_adam" not in params and not offload_opt:
        # torch.optim.AdamW: the single-process optimizer, and no JIT-compiled op on first use
        params["torch_adam"] = True
    if offload_opt and params.get("torch_adam"):
        raise ConfigError(f"{source}: optimizer.params.torch_adam = true with zero_optimization.offload_optimizer: "
                          "optimizer offload runs DeepSpeed's CPU Adam; remove torch_adam")
    if str(opt["type"]).lower() == "adam" and params.get("adam_w_mode") is False:
        raise ConfigError(f"{source}: optimizer.params.adam_w_mode = false is Adam with L2 regularisation; rtpo "
                          "trains with AdamW (decoupled weight decay): remove adam_w_mode")
    settle(("optimizer", "params", "lr"), o.lr, "optim.lr")
    settle(("optimizer", "params", "betas"), [o.beta1, o.beta2], "[optim.beta1, optim.beta2]")
    settle(("optimizer", "params", "eps"), o.eps, "optim.eps")
    settle(("optimizer", "params", "weight_decay"), o.weight_decay, "optim.weight_decay")

    # Bucket sizes scale with the hidden size (the values the HF Trainer integration uses); without a
    # model at hand DeepSpeed's defaults apply.
    h = hidden_size
    for key, val in (("reduce_bucket_size", h * h if h else None),
                     ("stage3_prefetch_bucket_size", int(0.9 * h * h) if h else None),
                     ("stage3_param_persistence_threshold", 10 * h if h else None)):
        if zo.get(key) == AUTO:
            if val is None:
                del zo[key]
            else:
                zo[key] = val
    left = _auto_paths(out)
    if left:
        raise ConfigError(f"{source}: rtpo cannot fill \"auto\" for {', '.join(left)}; give explicit values")
    return out


def _auto_paths(node, prefix="") -> list:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _auto_paths(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == AUTO else []


def reference_ds_config(resolved: dict) -> dict:
    """The reference model's engine: inference only, ZeRO-3 partitioned like the policy."""
    out = {k: v for k, v in copy.deepcopy(resolved).items() if k not in ("optimizer", "scheduler")}
    out["zero_optimization"] = {k: v for k, v in out["zero_optimization"].items() if k != "offload_optimizer"}
    return out


def _hidden_size(model):
    c = model.config
    c = getattr(c, "text_config", None) or c
    for k in ("hidden_size", "d_model", "n_embd"):
        if isinstance(getattr(c, k, None), int):
            return getattr(c, k)
    return None


# ----------------------------------------------------------------------------- modules

class LogprobModule(torch.nn.Module):
    """Per-token log-probs of completions as ONE module forward, so that DeepSpeed and DDP see the whole
    computation (ZeRO-3 must gather the LM-head weight the fused kernel reads outside the head's forward)."""

    def __init__(self, lm, temperature: float):
        super().__init__()
        self.lm = lm
        self.temperature = temperature

    def forward(self, input_ids, attention_mask, position_ids, completion_ids, completion_mask, prompt_len,
                with_entropy=True):
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     completion_ids=completion_ids, completion_mask=completion_mask, prompt_len=prompt_len)
        return completion_logprobs(self.lm, batch, self.temperature, with_entropy=with_entropy)


_BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "completion_ids", "completion_mask", "prompt_len")


class _InDeepSpeedCheckpoint:
    """Stands for the optimizer under DeepSpeed: the engine owns gradients and optimizer state (zeroed
    by engine.step, saved in the checkpoint's deepspeed/ folder)."""

    def zero_grad(self, set_to_none=True):
        pass

    def state_dict(self):
        return {"in": DS_DIR}

    def load_state_dict(self, state):
        pass


@contextlib.contextmanager
def gathered_for_generation(engine):
    """ZeRO-3: gather all parameters once and lift DeepSpeed's fetch/release hooks, so that the many
    small forwards of decoding run on full local weights (one all-gather per phase, not one per layer
    per token). Each GPU holds the full 16-bit weights meanwhile."""
    import deepspeed

    opt = engine.optimizer
    offload = getattr(opt, "parameter_offload", None) or opt
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        for h in list(offload.forward_hooks) + list(offload.backward_hooks):
            h.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


# ----------------------------------------------------------------------------- the trainer

class DistributedTrainer(Trainer):
    """Trainer for W >= 1 processes under DeepSpeed (run.deepspeed set) or DDP (torchrun, no config)."""

    def __init__(self, cfg: RTPOConfig, log=None):
        self.use_deepspeed = bool(cfg.run.deepspeed)
        self.stage = 0
        ds_raw = None
        if self.use_deepspeed:
            ds_raw = load_ds_config(cfg.run.deepspeed)
            ensure_launch_env()
        self.world, self.rank, self.local_rank = world_size(), rank(), local_rank()
        self.gas = micro_batches_per_update(cfg, self.world)
        device_type = self._place(cfg)  # before importing DeepSpeed: it picks its accelerator on import
        if ds_raw is not None:  # fail on a bad config before loading anything
            try:
                import deepspeed  # noqa: F401
            except ImportError as e:
                raise ConfigError(f"run.deepspeed = {cfg.run.deepspeed!r} but DeepSpeed cannot be imported ({e}): "
                                  "pip install deepspeed, or drop --run.deepspeed (under torchrun rtpo then trains "
                                  "with DDP)") from None
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
            self.stage = zero_stage(ds_raw)
            resolve_ds_config(ds_raw, cfg, self.world, source=cfg.run.deepspeed)
        init_process_group(self.use_deepspeed, device_type)
        self.engine = self.ref_engine = self.ddp = None
        self._pending_resume = None
        self._micro_count = 0
        self._scratch = None
        main_log = log or (lambda msg: print(msg, flush=True))
        with _local_main_first(self.local_rank):
            super().__init__(cfg, log=main_log if self.rank == 0 else (lambda msg: None), comm=TorchComm())
        self.run_dir = self.out
        if self.use_deepspeed:
            self._init_deepspeed(ds_raw)
        else:
            self._init_ddp()
        if self._pending_resume:
            self._load_state(self._pending_resume)
        if self.rank != 0:
            # This process's config.json / metrics.jsonl / summary.json would duplicate rank 0's:
            # Trainer.train writes them to self.out, so point it at a throwaway folder.
            self.cfg.log.progress = self.cfg.log.plot = False
            self.cfg.log.report_to = "none"
            self._scratch = tempfile.mkdtemp(prefix=f"rtpo-rank{self.rank}-")
            self.out = self._scratch
            self.writes_run_dir = False  # rank 0 holds the run folder's lock for the whole run
        mode = f"DeepSpeed ZeRO-{self.stage}" if self.use_deepspeed else "DDP"
        self.log(f"[rtpo] {mode}: {self.world} process(es), {cfg.rollout.prompts_per_step // self.world} prompts x "
                 f"{cfg.rollout.num_generations} completions each per step, {self.gas} micro batch(es) per update")

    # --- setup ---------------------------------------------------------------------------------
    def _place(self, cfg) -> str:
        dev = cfg.run.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev.startswith("cuda"):
            if self.world > 1:
                if dev not in ("cuda", f"cuda:{self.local_rank}"):
                    raise ConfigError(f"run.device = {cfg.run.device!r} with {self.world} processes: each process "
                                      "uses cuda:LOCAL_RANK; leave --run.device auto")
                dev = f"cuda:{self.local_rank}"
            torch.cuda.set_device(torch.device(dev).index or 0)
            cfg.run.device = dev
            return "cuda"
        if self.use_deepspeed:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return "cpu"

    def _init_deepspeed(self, ds_raw):
        import deepspeed

        self.ds_config = resolve_ds_config(ds_raw, self.cfg, self.world, hidden_size=_hidden_size(self.model),
                                           source=self.cfg.run.deepspeed)
        lr_fn = self.scheduler.lr_lambdas[0]
        module = self._logprob_module(self.model)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
            config=self.ds_config, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn))
        self.optimizer = _InDeepSpeedCheckpoint()
        if self.ref is not None and self.stage == 3:
            self.ref_engine = deepspeed.initialize(model=self._logprob_module(self.ref),
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

    def _init_ddp(self):
        from torch.nn.parallel import DistributedDataParallel as DDP

        kw = {"device_ids": [self.device.index or 0]} if self.device.type == "cuda" else {}
        self.ddp = DDP(LogprobModule(self.model, self.cfg.rollout.temperature), **kw)

    @contextlib.contextmanager
    def _generation_context(self):
        if self.use_deepspeed and self.stage == 3:
            with gathered_for_generation(self.engine):
                yield
        else:
            yield

    def rollout(self, step: int) -> dict:
        with self._generation_context():
            return super().rollout(step)

    def _completion_logprobs(self, model, batch, with_entropy=True):
        args = {k: batch[k] for k in _BATCH_KEYS}
        if model is self.model and self.engine is not None:
            return self.engine(**args, with_entropy=with_entropy)
        if model is self.model and self.ddp is not None and torch.is_grad_enabled():
            # Gradients are all-reduced on the last micro batch of each update only.
            last = self._micro_count % self.gas == self.gas - 1
            with contextlib.nullcontext() if last else self.ddp.no_sync():
                return self.ddp(**args, with_entropy=with_entropy)
        if model is self.ref and self.ref_engine is not None:
            return self.ref_engine(**args, with_entropy=with_entropy)
        return super()._completion_logprobs(model, batch, with_entropy)

    def _backward(self, loss):
        # DeepSpeed and DDP average gradients over processes; each loss is already a share of the
        # global loss (global normalisers), so scale by W to get the gradient of the global loss.
        if self.engine is not None:
            self.engine.backward(loss * self.world, scale_wrt_gas=False)
            self.engine.step()  # updates (clipping, skipping non-finite steps) at the accumulation boundary only
        else:
            (loss * self.world).backward()
        self._micro_count += 1

    def _clip_and_norm(self) -> float:
        if self._micro_count % self.gas:
            raise RuntimeError(f"internal: {self._micro_count % self.gas} micro batches since the last update, but "
                               f"gradient_accumulation_steps = {self.gas}")
        if self.engine is None:
            return super()._clip_and_norm()
        if not self.engine.was_step_applied():  # DeepSpeed found non-finite gradients on some process
            return float("nan")
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0  # None: the user turned off compute_grad_norm

    def _optimizer_step(self):
        if self.engine is None:
            super()._optimizer_step()

    # --- checkpoints ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _full_weights(self):
        if self.use_deepspeed and self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                yield
        else:
            yield

    def _write_checkpoint(self, tmp):
        tmp = self.comm.broadcast(tmp)  # rank 0's temporary folder, from ckpt.save_checkpoint
        if self.engine is not None:
            self.engine.save_checkpoint(os.path.join(tmp, DS_DIR), tag=DS_TAG, save_latest=False)
        with self._full_weights():
            if self.rank == 0:
                super()._write_checkpoint(tmp)
        self.comm.barrier()  # every shard is written before rank 0 fsyncs and renames the folder

    def save(self) -> str:
        if self.rank == 0:  # rank 0's output_dir is the run's (run_dir): Trainer.save, with the write above
            path = super().save()
        else:
            self._write_checkpoint(None)
            path = None
        return self.comm.broadcast(path)  # returns once the checkpoint is in place

    def _load_state(self, path: str) -> None:
        has_ds = os.path.isdir(os.path.join(path, DS_DIR))
        if self.use_deepspeed:
            if self.engine is None:  # called from Trainer.__init__: the engine does not exist yet
                self._pending_resume = path
                return
            if not has_ds:
                raise ConfigError(f"run.resume: {path} was written without DeepSpeed (no {DS_DIR}/ folder); resume it "
                                  f"without --run.deepspeed, or start a new run from its weights with --model {path}")
            saved_world = len({m.group(1) for f in os.listdir(os.path.join(path, DS_DIR, DS_TAG))
                               for m in [re.search(r"zero_pp_rank_(\d+)_", f)] if m})
            if saved_world and saved_world != self.world:
                raise ConfigError(f"run.resume: {path} holds the ZeRO optimizer state of {saved_world} processes, this "
                                  f"run has {self.world}; resume with {saved_world} processes (DeepSpeed cannot "
                                  "re-partition it; its universal-checkpoint tools can convert it), or start a new run "
                                  f"from its weights with --model {path}")
            loaded, _ = self.engine.load_checkpoint(os.path.join(path, DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
            if loaded is None:
                raise ConfigError(f"run.resume: DeepSpeed could not load {os.path.join(path, DS_DIR)}")
        elif has_ds:
            raise ConfigError(deepspeed_checkpoint_message(path))
        super()._load_state(path)

    def train(self) -> dict:
        try:
            return super().train()
        finally:
            if self._scratch:
                shutil.rmtree(self._scratch, ignore_errors=True)


def deepspeed_checkpoint_message(path: str) -> str:
    return (f"run.resume: {path} was written by a DeepSpeed run (its optimizer state is in ZeRO shards under "
            f"{DS_DIR}/); resume with the same --run.deepspeed config and number of processes, or start a new run "
            f"from its weights with --model {path}")


def make_trainer(cfg: RTPOConfig, log=None) -> Trainer:
    """The plain Trainer for one process without DeepSpeed; DistributedTrainer otherwise."""
    if cfg.run.deepspeed or world_size() > 1:
        return DistributedTrainer(cfg, log=log)
    if cfg.run.resume:
        try:
            path = ckpt.resolve_resume(cfg.run.output_dir if cfg.run.resume == "auto" else cfg.run.resume, check=False)
        except ckpt.CheckpointError:
            path = None  # Trainer reports it (and verifies the checkpoint it picks)
        if path and os.path.isdir(os.path.join(path, DS_DIR)):
            raise ConfigError(deepspeed_checkpoint_message(path))
    return Trainer(cfg, log=log)
