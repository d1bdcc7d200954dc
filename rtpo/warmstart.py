"""Supervised warm-start: a random tiny model cannot do RL from scratch, so it first learns the
response format (and some arithmetic) on a split disjoint from the RL and eval questions.

The result is cached on disk, keyed by everything that determines it, so later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random

import torch

from rtpo.checkpoint import write_atomically
from rtpo.prompts import PromptBuilder, response_ids
from rtpo.vision import batch_images, is_vision_model, mrope_positions


def cache_key(model, tokenizer, wc, dc, cc, examples=()) -> str:
    # The initial weights and the exact SFT rows (which depend on the held-out split they avoid)
    # are part of the key: a cached model is reused only if it would be rebuilt identically.
    weights = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(t.detach().float().cpu().numpy().tobytes())
    blob = json.dumps({
        "model": model.config.to_dict(), "vocab": len(tokenizer), "init": weights.hexdigest(),
        "rows": hashlib.sha256("\n".join(e.question + e.image_digest for e in examples).encode()).hexdigest(),
        "warmstart": {k: getattr(wc, k) for k in ("steps", "lr", "batch_size", "num_examples", "seed",
                                                   "reasoning_fraction", "mix_from", "max_operands")}
                     | ({"frozen": sorted(n for n, p in model.named_parameters() if not p.requires_grad)}
                        if is_vision_model(model) else {}),
        "data": {k: getattr(dc, k) for k in ("min_operands", "max_operands", "max_operand", "system_prompt", "modulus")},
        "think": [cc.think_open, cc.think_close], "version": 2,
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sft_batch(seqs: list, pad_id: int, device):
    """Right-padded inputs with labels -100 on prompt and padding."""
    L = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p):n] = torch.tensor(r)
        attn[i, :n] = 1
    return ids.to(device), attn.to(device), labels.to(device)


def image_inputs(model, builder, encs, ids, attn, device) -> dict:
    """Extra forward inputs of an SFT batch whose rows have images: pixel_values, image_grid_thw and the
    M-RoPE positions (from the model, over the right-padded rows); {} without images."""
    if not any(e.images for e in encs):
        return {}
    extra = batch_images([builder.image_inputs(e) for e in encs], device)
    extra["position_ids"], _ = mrope_positions(model, ids, attn, extra["image_grid_thw"])
    return extra


def reasoning_probability(step: int, wc) -> float:
    """Chance that a warm-start example at `step` shows its trace: 1 until mix_from of the steps
    (the model learns to write the steps), then reasoning_fraction (which sets how often the model
    starts reasoning on its own: the rest of the time it answers directly)."""
    return 1.0 if step < wc.mix_from * wc.steps else wc.reasoning_fraction


def train_sft(model, tokenizer, builder: PromptBuilder, examples, wc, device, seed=0, log=print):
    """AdamW on response tokens only, cosine LR decay. Returns (the final mean loss, tokens through
    forward + backward: prompts and responses, padding excluded)."""
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    encs = [(ex, builder.encode(ex)) for ex in examples]
    data = [(enc.base, response_ids(builder, ex, enc, eos), response_ids(builder, ex, enc, eos, with_reasoning=False),
             enc) for ex, enc in encs]
    params = [p for p in model.parameters() if p.requires_grad]  # a frozen vision encoder stays as it is
    opt = torch.optim.AdamW(params, lr=wc.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s / max(wc.steps, 1), 1.0))))
    model.train()
    recent, tokens = [], 0
    for step in range(wc.steps):
        p = reasoning_probability(step, wc)
        picked = rng.sample(data, min(wc.batch_size, len(data)))
        batch = [(base, full if rng.random() < p else short) for base, full, short, _ in picked]
        ids, attn, labels = sft_batch(batch, tokenizer.pad_token_id, device)
        tokens += int(attn.sum())
        loss = model(input_ids=ids, attention_mask=attn, labels=labels,
                     **image_inputs(model, builder, [enc for *_, enc in picked], ids, attn, device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        if (step + 1) % 100 == 0 or step + 1 == wc.steps:
            log(f"[warmstart] step {step + 1}/{wc.steps} loss {sum(recent) / len(recent):.4f}")
    return sum(recent) / max(len(recent), 1), tokens


def warmstart(model, tokenizer, builder, examples, wc, dc, cc, device, seed=0, log=print):
    """Load the cached warm-started weights or train and cache them. Returns the model."""
    from rtpo.models import load_pretrained

    path = os.path.join(wc.cache_dir, f"warmstart-{cache_key(model, tokenizer, wc, dc, cc, examples)}")
    if os.path.isfile(os.path.join(path, "config.json")):
        log(f"[warmstart] using cached warm-start {path}")
        return load_pretrained(path).to(device)
    log(f"[warmstart] supervised warm-start: {wc.steps} steps on {len(examples)} disjoint examples")
    model.to(device)
    train_sft(model, tokenizer, builder, examples, wc, device, seed=seed, log=log)
    write_atomically(path, model.save_pretrained)
    log(f"[warmstart] cached at {path}")
    return model
