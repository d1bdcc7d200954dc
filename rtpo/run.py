"""A run, built once (`setup`): what every stage reads and none changes.

    setup(cfg, backend) -> Run: the checkpoint to resume from, the device and dtype (the backend's),
    data, tokenizer, model (warm-started, LoRA attached), reference policy, image processor, the splits
    encoded as prompts, and the dataset columns reward functions receive.

The config is only read here and afterwards: nothing writes it once `validate()` has passed.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from rtpo import checkpoint as ckpt, lora, runlock, warmstart
from rtpo.config import ConfigError, RTPOConfig
from rtpo.data import load_splits
from rtpo.device import autocast
from rtpo.metrics import report_to_problem
from rtpo.models import load_model_and_tokenizer, load_pretrained, load_tokenizer, load_vision_processor
from rtpo.prompts import PromptBuilder, PromptTooLong
from rtpo.rewards import RESERVED, build_reward_functions, missing_arguments
from rtpo.vision import freeze_encoder


@dataclass(frozen=True)
class Run:
    """Everything setup decided; immutable (the models' weights train, the fields never change)."""
    cfg: RTPOConfig
    log: Callable
    resume_from: Optional[str]       # the verified checkpoint this run continues, or None
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # autocast dtype (None: float32)
    reward_fns: dict
    column_names: list               # dataset columns reward functions receive by name
    train_rows: list                 # Examples whose prompts fit (the others were dropped with a warning)
    eval_rows: list
    train_enc: list                  # their EncodedExamples
    eval_enc: list
    truncated: dict                  # split -> reasoning traces cut to fit data.max_prompt_tokens
    dropped: dict                    # split -> rows dropped
    model: torch.nn.Module           # the policy (a PEFT-adapted HF model with LoRA)
    tok: object
    vision: object                   # rtpo.vision.VisionProcessor, or None for a text-only model
    builder: PromptBuilder
    peft: object                     # the PEFT model with LoRA, else None
    base_pending: Optional[dict]     # LoRA: base tensors to write to <run>/base_model at the first checkpoint
    ref: object                      # the reference policy (None without a KL term)
    close_ids: list                  # curriculum.think_close's tokens
    eos_ids: tuple                   # every token that ends a completion
    sft_tokens: int                  # tokens through the sft.steps phase before RL (0: none, or resumed)

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def decode(self, ids) -> str:
        """A completion's text, without its final end-of-sequence token."""
        if ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        return self.tok.decode(ids, skip_special_tokens=False)


def setup(cfg: RTPOConfig, backend, log=print, train: bool = True, adapter: str | None = None) -> Run:
    """The run of `cfg` on `backend`'s device. `train`: the run folder is checked (busy, holds a run) and a
    checkpoint to resume is resolved; False for evaluation only (nothing of run.output_dir is read).
    `adapter`: a PEFT adapter folder whose merged model replaces model.name (rtpo.eval)."""
    resume_from = resolve_resume(cfg, log) if train else None
    try:
        reward_fns = build_reward_functions(cfg.rewards)
    except ValueError as e:
        raise ConfigError(f"rewards.custom: {e}") from None
    if report_to_problem(cfg.log.report_to):
        raise ConfigError(report_to_problem(cfg.log.report_to))
    device, amp_dtype = backend.device, backend.amp_dtype
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)

    train_rows, eval_rows = load_splits(cfg.data)
    columns = reward_columns(reward_fns, train_rows + eval_rows, log)
    resumed_base = None
    if resume_from:
        log(f"[rtpo] resuming from {resume_from}")
        if lora.enabled(cfg) or lora.is_adapter(resume_from):
            model, resumed_base = lora.resume_base(cfg, resume_from)
        else:
            model = load_pretrained(resume_from)
        tok = load_tokenizer(resume_from)
    else:
        model, tok = starting_model(cfg, adapter)
    vision = _load_vision(cfg, resume_from, tok, model, train_rows + eval_rows)
    check_context(cfg, model)
    set_threads(cfg.run.num_threads, device, model)
    builder = PromptBuilder(tok, cfg.curriculum, cfg.data.max_prompt_tokens, cfg.data.system_prompt, vision=vision)
    train_enc, train_kept, train_cut, train_dropped = encode_split(builder, train_rows, "train", cfg, log)
    eval_enc, eval_kept, eval_cut, eval_dropped = encode_split(builder, eval_rows, "eval", cfg, log)
    held = train_kept + eval_kept
    freeze = cfg.model.freeze_vision_encoder
    freeze_encoder(model, freeze)
    if resume_from is None:  # a cached warm-start is loaded unfrozen
        with warmstart_threads(cfg, device):
            model = freeze_encoder(warmstart.for_run(model, tok, builder, cfg, held, device, log=log), freeze)
    peft, pending = (lora.attach_for_run(model, cfg, cfg.run.output_dir, resume_from, resumed_base,
                                         changed=warmstart.enabled(cfg)) if lora.enabled(cfg) else (None, None))
    model.to(device)  # with LoRA `model` stays the (adapted) HF model
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if peft is not None:  # frozen embeddings: checkpointed blocks need inputs that require grad
            model.enable_input_require_grads()
    sft_tokens = warmstart.sft_first(model, tok, builder, train_kept, cfg, device, log) \
        if resume_from is None and cfg.sft.steps else 0
    ref = reference(cfg, model, peft, resume_from, lambda m: warmstart.for_run(
        freeze_encoder(m, freeze), tok, builder, cfg, held, device, log=log), device)
    close_ids = tok(cfg.curriculum.think_close, add_special_tokens=False)["input_ids"]
    eos_ids = tuple(sorted({tok.eos_token_id} | set(_as_list(model.generation_config.eos_token_id))))
    return Run(cfg=cfg, log=log, resume_from=resume_from, device=device, amp_dtype=amp_dtype, reward_fns=reward_fns,
               column_names=columns, train_rows=train_kept, eval_rows=eval_kept, train_enc=train_enc,
               eval_enc=eval_enc, truncated={"train": train_cut, "eval": eval_cut},
               dropped={"train": train_dropped, "eval": eval_dropped}, model=model, tok=tok, vision=vision,
               builder=builder, peft=peft, base_pending=pending, ref=ref, close_ids=close_ids, eos_ids=eos_ids,
               sft_tokens=sft_tokens)


def resolve_resume(cfg: RTPOConfig, log=print) -> str | None:
    """The checkpoint to resume from (verified), or None for a fresh run. Refuses an unusable or busy
    output folder, and a folder holding a run unless told to resume or overwrite it."""
    out = cfg.run.output_dir
    runlock.check_output_dir(out)  # before anything is read from it: a live run may be writing it
    r, ckpts = cfg.run.resume, ckpt.list_checkpoints(out)
    holds_run = bool(ckpts) or any(os.path.exists(os.path.join(out, f)) for f in ("metrics.jsonl", "config.json"))
    if r == "auto" and holds_run and not ckpts:  # nothing to lose: it stopped before its first checkpoint
        log(f"[rtpo] {out} holds no checkpoint yet: --resume auto starts the run over from step 0")
        return None
    if r:
        try:
            return ckpt.resolve_resume(out if r == "auto" else r, log=log)
        except ckpt.CheckpointError as e:
            raise ConfigError(str(e)) from None
    if not cfg.run.overwrite and holds_run:
        raise ConfigError(f"run.output_dir {out!r} already holds a run; continue it with --resume auto, "
                          "or pick another --output_dir, or pass --run.overwrite true")
    return None


def starting_model(cfg: RTPOConfig, adapter: str | None = None):
    """(model, tokenizer) a fresh run starts from, before any warm-start; `adapter`: that PEFT adapter
    merged into its base (adapter_config.json's, or its run's base_model/)."""
    if adapter is not None:
        model = lora.load_merged(adapter)
        base = lora.resolve_base(adapter)[0]
        has_tok = any(os.path.isfile(os.path.join(adapter, n)) for n in ("tokenizer.json", "tokenizer_config.json"))
        return model, load_tokenizer(adapter if has_tok or not base else base)
    # A warm-started model stands in for a pretrained checkpoint: it does not vary with run.seed.
    seed = cfg.warmstart.seed if warmstart.enabled(cfg) else cfg.run.seed
    return load_model_and_tokenizer(cfg.model, seed=seed)


def reference(cfg: RTPOConfig, model, peft, resume_from, warmstarted, device):
    """The reference policy of the KL term (None with loss.beta 0): the starting policy, also on resume.
    With LoRA the same model with its adapters off; else a frozen copy."""
    if cfg.loss.beta <= 0:
        return None
    if peft is not None:
        return lora.AdaptersOff(peft)
    start = model if resume_from is None else warmstarted(starting_model(cfg)[0])
    return copy.deepcopy(start).to(device).eval().requires_grad_(False)


def _load_vision(cfg: RTPOConfig, resume_from, tok, model, rows):
    """The image processor of a vision-language model (saved in every checkpoint), or None. Rows with
    images and a text-only model are refused here, before anything is written."""
    source = resume_from or cfg.model.name
    kw = {} if resume_from or source == "embedded-vl" else {"revision": cfg.model.revision,
                                                            "trust_remote_code": cfg.model.trust_remote_code}
    vision = load_vision_processor(source, tok, model, max_pixels=cfg.model.max_pixels, **kw)
    with_images = next((e for e in rows if e.images), None)
    if with_images is not None and vision is None:
        raise ConfigError(f"data.image_field: row {with_images.index} of {cfg.data.dataset!r} has images, but "
                          f"model.name {cfg.model.name!r} is a text-only model; use a vision-language model "
                          "(e.g. --model embedded-vl, or Qwen/Qwen2.5-VL-3B-Instruct), or "
                          "--data.image_field none to drop the images")
    return vision


def set_threads(n: int, device: torch.device, model) -> None:
    # Small models on CPU: per-op thread synchronisation costs more than the work it splits
    # (measured 25x slower update on a loaded 2-core machine with 2 threads; see README).
    if n == 0 and device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 20_000_000:
        n = 1
    if n:
        torch.set_num_threads(n)


# torch's intra-op thread count before any run changed it (cores, or OMP_NUM_THREADS)
_DEFAULT_THREADS = torch.get_num_threads()
# OpenMP is not fork-safe: a forked child (a multiprocessing "fork" worker) can hang in its first parallel
# region with a larger team than it inherited, so such a process never raises its thread count.
_FORKED = []
os.register_at_fork(after_in_child=lambda: _FORKED.append(True))


@contextlib.contextmanager
def warmstart_threads(cfg: RTPOConfig, device: torch.device):
    """run.num_threads 0 (auto), CPU, one process not forked from another: the warm-start runs at torch's
    default thread count, then the run's count is restored. Its steps (32 whole sequences) split well
    across cores, unlike the RL micro batches set_threads keeps on one thread: 0.21 vs 0.35 s a step on
    an idle 2-core machine."""
    from rtpo.backends import is_parallel

    n = torch.get_num_threads()
    if cfg.run.num_threads == 0 and device.type == "cpu" and not is_parallel(cfg) and not _FORKED:
        torch.set_num_threads(_DEFAULT_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def encode_split(builder: PromptBuilder, rows: list, split: str, cfg: RTPOConfig, log) -> tuple:
    """(encoded examples, the rows kept, traces truncated, rows dropped): rows whose question alone exceeds
    data.max_prompt_tokens are dropped with a warning; a split none of whose rows fit is refused."""
    encs, kept, dropped, truncated, shortest = [], [], 0, 0, None
    for ex in rows:
        try:
            enc = builder.encode(ex)
        except PromptTooLong as e:
            dropped += 1
            shortest = e.need if shortest is None else min(shortest, e.need)
            if dropped == 1:
                log(f"[rtpo] warning: {split} {e}")
            continue
        truncated += enc.truncated
        encs.append(enc)
        kept.append(ex)
    budget = cfg.data.max_prompt_tokens
    if dropped:
        log(f"[rtpo] warning: dropped {dropped} {split} rows whose question exceeds data.max_prompt_tokens")
    if truncated:
        log(f"[rtpo] warning: {truncated} {split} reasoning traces cut to fit data.max_prompt_tokens = {budget}")
    if rows and not encs:
        images = " (its image tokens included; --model.max_pixels lowers them)" if any(e.images for e in rows) else ""
        raise ConfigError(f"no {split} rows fit data.max_prompt_tokens = {budget}: the shortest question takes "
                          f"{shortest} tokens{images}; raise --data.max_prompt_tokens above that")
    return encs, kept, truncated, dropped


def check_context(cfg: RTPOConfig, model) -> None:
    """A prompt of data.max_prompt_tokens plus the longest completion must fit the model's positions:
    refuse at setup rather than silently run past the context."""
    c = cfg
    config = getattr(model, "config", None)
    ctx = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
    new = max(c.rollout.max_new_tokens, c.eval.max_new_tokens if c.eval.num_examples else 0)
    if isinstance(ctx, int) and c.data.max_prompt_tokens + new > ctx:
        raise ConfigError(f"data.max_prompt_tokens + new tokens = {c.data.max_prompt_tokens} + {new} exceeds the "
                          f"model's context of {ctx} positions; lower --data.max_prompt_tokens or "
                          "--rollout.max_new_tokens / --eval.max_new_tokens")


def reward_columns(reward_fns: dict, rows: list, log) -> list:
    """The dataset columns reward functions receive by name: every column of the rows, except names the
    trainer passes itself (warned about once). A reward function that requires an argument no column or
    trainer argument provides is refused here, before anything runs."""
    names = list(dict.fromkeys(k for ex in rows for k in ex.columns))
    clash = [n for n in names if n in RESERVED]
    if clash:
        log(f"[rtpo] warning: dataset column(s) {', '.join(map(repr, clash))} have the name of a reward "
            "function argument; reward functions receive the trainer's value under that name")
    names = [n for n in names if n not in RESERVED]
    for name, (fn, _) in reward_fns.items():
        miss = missing_arguments(fn, set(RESERVED) | set(names))
        if miss:
            raise ConfigError(f"reward function {name!r} requires argument(s) {', '.join(map(repr, miss))}, which "
                              f"no dataset column or trainer argument provides; dataset columns: "
                              f"{', '.join(names) or 'none'}; trainer arguments: {', '.join(sorted(RESERVED))}")
    return names


def _as_list(x):
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
