"""What the data-parallel backends (rtpo/backends/ddp.py, zero.py) share: launch environment, process
group, placement, DeepSpeed config resolution, the one-module log-prob forward, ZeRO-3 generation.

How W processes train exactly like one process on the same batch:
- sharding: each process takes a contiguous 1/W of the step's prompts with all G completions of
  each (Trainer.batch_indices via its Comm), so group statistics never cross processes. Rewards are
  gathered before advantages (Scorer.score), so `scale_rewards = batch` uses the whole batch's std.
- sampling: every process draws the step's full uniform table from the shared generator and samples
  its columns (rtpo.generation.draw_uniforms), so its completions are the ones one process would
  sample for those rows, and the generator state stays identical everywhere.
- loss: the normalisers (tokens, sequences) are summed over processes; DeepSpeed and DDP average
  gradients over the W processes, so each process's loss is multiplied by W before backward.
- ZeRO-3 generation: parameters are gathered once per rollout / evaluation phase and the ZeRO
  hooks are lifted meanwhile, so decoding does not all-gather every layer for every token. The
  price: during generation each GPU holds a full copy of the (16-bit) weights.
- metrics are reduced over processes as each declares (rtpo.metrics); only the main process writes
  the run folder and holds its lock. Evaluation is sharded, means combined by example counts.
- checkpoints: the main process writes the usual folder (HF weights, tokenizer, trainer_state.pt);
  with DeepSpeed every process adds its ZeRO shards under `deepspeed/` before the atomic rename,
  and `--resume` restores them (same world size and ZeRO stage).

RNG states are the same on every process by construction (same seeds, same draws), so rank 0's
trainer_state.pt restores all of them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import socket

import torch
import torch.distributed as dist

from rtpo.config import ConfigError, RTPOConfig
from rtpo.device import auto_device, auto_dtype
from rtpo.logprobs import completion_logprobs, mini_batches

AUTO = "auto"
DS_TAG = "state"


# ----------------------------------------------------------------------------- world / rank

def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


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


@contextlib.contextmanager
def local_main_first(local_rank_: int):
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
    counts = sorted({math.ceil(len(s) / m) for s in mini_batches(rows, M)})
    if len(counts) > 1:
        raise ConfigError(f"optim.mini_batches = {M} splits each process's {rows} rollout rows into mini batches of "
                          f"{counts} micro batches (optim.micro_batch_size = {m}); DeepSpeed needs one "
                          f"gradient_accumulation_steps: pick mini_batches and micro_batch_size so that every mini "
                          f"batch has the same number of micro batches (e.g. mini_batches dividing {rows})")
    return counts[0]


def _ds_dtype(cfg: RTPOConfig, ds: dict, source: str, device: str):
    """(bf16, fp16) for DeepSpeed from run.dtype; with run.dtype auto an explicit DeepSpeed setting wins."""
    want = {"float32": (False, False), "bfloat16": (True, False), "float16": (False, True)}.get(cfg.run.dtype)
    given = [(ds.get(k) or {}).get("enabled", AUTO) if isinstance(ds.get(k), dict) else AUTO for k in ("bf16", "fp16")]
    if want is None:  # run.dtype auto
        if given[0] is True or given[1] is True:
            return given[0] is True, given[1] is True
        return auto_dtype("auto", device) is torch.bfloat16, False
    for name, g, w in zip(("bf16", "fp16"), given, want):
        if g != AUTO and bool(g) != w:
            raise ConfigError(f"{source}: {name}.enabled = {json.dumps(g)} but run.dtype = {cfg.run.dtype!r}; make "
                              f"them agree, or write \"auto\" in the DeepSpeed config")
    return want


def resolve_ds_config(ds: dict, cfg: RTPOConfig, world: int, hidden_size: int | None = None,
                      source: str = "DeepSpeed config", device: str | None = None) -> dict:
    """A copy of `ds` with every "auto" filled from the rtpo config, so the two never disagree;
    a value given explicitly that differs from the rtpo config is an error naming both. `cfg` is
    only read: the precision it settles is `ds_amp_dtype` of the result."""
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
        _settle(out, path, want, rtpo_key, source)

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

    bf16, fp16 = _ds_dtype(cfg, out, source, device or auto_device(cfg.run.device))
    for name, on in (("bf16", bf16), ("fp16", fp16)):
        node = out.get(name)
        if not isinstance(node, dict):
            node = out[name] = {}
        node["enabled"] = on

    zo = out.setdefault("zero_optimization", {})
    _resolve_optimizer(out, cfg, source, settle)
    _fill_bucket_sizes(zo, hidden_size)
    left = _auto_paths(out)
    if left:
        raise ConfigError(f"{source}: rtpo cannot fill \"auto\" for {', '.join(left)}; give explicit values")
    return out


def ds_amp_dtype(resolved: dict, cfg: RTPOConfig, device: str):
    """The autocast dtype of a run with this resolved DeepSpeed config: its bf16 / fp16, else run.dtype's."""
    if resolved["bf16"]["enabled"]:
        return torch.bfloat16
    if resolved["fp16"]["enabled"]:
        return torch.float16
    return auto_dtype(cfg.run.dtype, device)


def _settle(out: dict, path: tuple, want, rtpo_key: str, source: str) -> None:
    """Fill `path` of the DeepSpeed config with the rtpo value when it is "auto" (or absent); refuse a
    given value that differs."""
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


def _resolve_optimizer(out: dict, cfg: RTPOConfig, source: str, settle) -> None:
    """The optimizer section: AdamW with the rtpo hyper-parameters (torch's unless offloaded)."""
    o, zo = cfg.optim, out["zero_optimization"]
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


def _fill_bucket_sizes(zo: dict, h: int | None) -> None:
    """Bucket sizes scale with the hidden size (the values the HF Trainer integration uses); without a
    model at hand DeepSpeed's defaults apply."""
    for key, val in (("reduce_bucket_size", h * h if h else None),
                     ("stage3_prefetch_bucket_size", int(0.9 * h * h) if h else None),
                     ("stage3_param_persistence_threshold", 10 * h if h else None)):
        if zo.get(key) == AUTO:
            if val is None:
                del zo[key]
            else:
                zo[key] = val


def _auto_paths(node, prefix="") -> list:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _auto_paths(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == AUTO else []


def reference_ds_config(resolved: dict) -> dict:
    """The reference model's engine: inference only, ZeRO-3 partitioned like the policy."""
    out = {k: v for k, v in copy.deepcopy(resolved).items() if k not in ("optimizer", "scheduler")}
    out["zero_optimization"] = {k: v for k, v in out["zero_optimization"].items() if k != "offload_optimizer"}
    return out


def hidden_size(model):
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

    def forward(self, with_entropy=True, **batch):
        # the batch travels as keyword tensors (collate's or pack's keys), so DDP / DeepSpeed see its inputs
        return completion_logprobs(self.lm, batch, self.temperature, with_entropy=with_entropy)


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


# ----------------------------------------------------------------------------- placement

def place(cfg: RTPOConfig, use_deepspeed: bool) -> str:
    """Put this process on its device (cuda:LOCAL_RANK with several processes) and return that device's
    name. Runs before DeepSpeed is imported: it picks its accelerator on import."""
    dev, world = auto_device(cfg.run.device), world_size()
    if dev.startswith("cuda"):
        if world > 1:
            if dev not in ("cuda", f"cuda:{local_rank()}"):
                raise ConfigError(f"run.device = {cfg.run.device!r} with {world} processes: each process "
                                  "uses cuda:LOCAL_RANK; leave --run.device auto")
            dev = f"cuda:{local_rank()}"
        torch.cuda.set_device(torch.device(dev).index or 0)
        return dev
    if use_deepspeed:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return dev


def check_boundary(micro_count: int, gas: int) -> None:
    """An update ends after a whole number of gradient-accumulation steps."""
    if micro_count % gas:
        raise RuntimeError(f"internal: {micro_count % gas} micro batches since the last update, but "
                           f"gradient_accumulation_steps = {gas}")
