"""Per-token log-probs (and entropy) of completions under a causal LM.

Every pass (policy, old policy, reference) comes through `completion_logprobs`: the decoder's last
hidden states at the completion positions go with the LM head's weight into the fused kernel
(kernels.linear_logprobs), so no [tokens, vocab] logits tensor is ever built.
"""

from __future__ import annotations

import torch

from kernels import linear_logprobs
from rtpo.vision import batch_images, prompt_image_hidden


def collate(prompts: list, completions: list, pad_id: int, device=None, images: list | None = None) -> dict:
    """[left-padded prompt | right-padded completion] rows.

    input_ids/attention_mask/position_ids: [B, P + T]; completion_ids/completion_mask: [B, T];
    prompt_len: P. Positions count real tokens only, as in generation. `images`: per row, its
    rtpo.vision.ImageInputs or None; when any row has images the batch also holds pixel_values and
    image_grid_thw (and the forward computes M-RoPE positions from the model)."""
    B = len(prompts)
    P = max(len(p) for p in prompts)
    T = max(max((len(c) for c in completions), default=0), 1)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    cmask = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
        if c:
            ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[i, P:P + len(c)] = 1
            cmask[i, :len(c)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": ids, "attention_mask": attn, "position_ids": pos,
           "completion_ids": ids[:, P:].clone(), "completion_mask": cmask, "prompt_len": P}
    if images is not None:
        out.update(batch_images(images))
    if device is not None:
        out = {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}
    return out


def _has_custom_head(model) -> bool:
    # Models that rescale or soft-cap logits after the head: take the plain logits path.
    cfg = model.config
    return bool(getattr(cfg, "final_logit_softcapping", None)) or getattr(cfg, "logit_scale", None) not in (None, 1.0)


def completion_logprobs(model, batch: dict, temperature: float = 1.0, with_entropy: bool = True):
    """log pi(completion token | prefix) / temperature-scaled, and the entropy of that
    distribution, [B, T] each (0 where completion_mask is 0)."""
    P = batch["prompt_len"]
    mask = batch["completion_mask"].bool()
    if batch.get("pixel_values") is not None:  # image prompts: vision tower + decoder with M-RoPE positions
        hidden = prompt_image_hidden(model, batch)[:, P - 1:-1]
        head = model.get_output_embeddings()
        return linear_logprobs(hidden, head.weight, batch["completion_ids"], getattr(head, "bias", None),
                               temperature=temperature, mask=mask, return_entropy=with_entropy)
    fwd = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if _has_custom_head(model):
        logits = model(**fwd).logits[:, P - 1:-1].float() / temperature
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1) * mask
        ent = -(logp_all.exp() * logp_all).sum(-1) * mask if with_entropy else None
        return logp, ent
    hidden = model.get_decoder()(**fwd).last_hidden_state[:, P - 1:-1]
    head = model.get_output_embeddings()
    return linear_logprobs(hidden, head.weight, batch["completion_ids"], getattr(head, "bias", None),
                           temperature=temperature, mask=mask, return_entropy=with_entropy)
