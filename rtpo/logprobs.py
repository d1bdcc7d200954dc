"""Per-token log-probs (and entropy) of completions under a causal LM.

Every pass (policy, old policy, reference) comes through `completion_logprobs`: the decoder's last
hidden states at the completion positions go with the LM head's weight into the fused kernel
(kernels.linear_logprobs), so no [tokens, vocab] logits tensor is ever built.

Two batch layouts, the same [B, T] outputs:

- `collate` (padded): one row per completion, [left-padded prompt | right-padded completion]. Every
  row costs the longest prompt plus the longest completion of the batch.
- `pack` (packed, prompt shared): one tree per distinct prompt, [prompt | completion 1 | ... |
  completion m] (each completion without its last token, which only predicts past the end), its m
  completions attending to that one copy of the prompt (a 4D attention mask:
  a completion token sees the prompt and its own earlier tokens, never another completion), trees
  laid end to end in rows no longer than the longest tree. The prompt is encoded once per micro
  batch instead of once per completion, its gradient flows back once, and no row carries padding
  beyond the tail of its packed row. Positions restart per completion at len(prompt), as in the
  padded layout, so the math is the same (rounding aside: matmul shapes differ).

`make_batch` picks `pack` unless the model's attention takes no custom mask. Prompts with images
(Qwen2-VL style) pack too: each tree's images are encoded once and its M-RoPE positions come from the
model's get_rope_index on its prompt (rtpo.vision.packed_images).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kernels import linear_logprobs
from rtpo.vision import batch_images, packed_image_hidden, packed_images, prompt_image_hidden

# Attention implementations that take a custom 4D mask as given (transformers' masking_utils returns a
# 4D mask as-is); flash-attention kernels take no mask, so packing falls back to the padded layout there.
PACKED_ATTENTION = ("sdpa", "eager")


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


def _trees(prompts: list, share_prefix: bool, keys) -> list:
    """[(prompt, [row indices])]: one tree per distinct prompt (per row without sharing), in order of
    first appearance. `keys` (one hashable per row) overrides what makes two prompts the same, e.g.
    when the prompt carries inputs beyond its token ids (images)."""
    trees: dict = {}
    for i, p in enumerate(prompts):
        k = (keys[i] if keys is not None else tuple(p)) if share_prefix else i
        trees.setdefault(k, (p, []))[1].append(i)
    return list(trees.values())


def tree_completions(prompt_len: int, mean_completion: float, hidden_size: int) -> int:
    """How many completions one tree should hold so that the FLOPs per completion are smallest. A tree
    of m completions of length T after a prompt of length P costs about a(P + mT) in its matmuls and
    b(P + mT)^2 in attention, which is dense over the tree (a completion's block against the other
    completions is computed, then masked); per completion that is least at m* = sqrt(P (a/b + P)) / T,
    with a/b = 6 H for a transformer layer (24 H^2 matmul FLOPs per token, 4 H per query-key pair).
    Long prompts (RTPO's hints) share across the whole group; long completions get smaller trees."""
    return max(1, round(math.sqrt(prompt_len * (6 * hidden_size + prompt_len)) / max(mean_completion, 1.0)))


def _split_trees(trees: list, completions: list, hidden_size: int) -> list:
    """Each tree cut into ceil(m / m*) trees of consecutive completions as even as possible (the prompt
    copied into each), m* from `tree_completions`."""
    out = []
    for p, rows in trees:
        m = tree_completions(len(p), sum(len(completions[i]) for i in rows) / len(rows), hidden_size)
        k = -(-len(rows) // m)
        out += [(p, list(part)) for part in np.array_split(np.asarray(rows), k)]
    return [(p, [int(i) for i in rows]) for p, rows in out]


def _first_fit(sizes: list) -> tuple:
    """Trees laid end to end into rows of the longest tree's length, first fit by decreasing size:
    ([(row, offset)] per tree, number of rows, row length)."""
    L = max(sizes)
    fill, place = [], [None] * len(sizes)
    for t in sorted(range(len(sizes)), key=lambda t: -sizes[t]):  # stable: ties keep their order
        for r, used in enumerate(fill):
            if used + sizes[t] <= L:
                place[t], fill[r] = (r, used), used + sizes[t]
                break
        else:
            place[t] = (len(fill), 0)
            fill.append(sizes[t])
    return place, len(fill), L


def pack(prompts: list, completions: list, pad_id: int, device=None, *, share_prefix: bool = True, keys=None,
         hidden_size: int | None = None) -> dict:
    """The packed layout (module docstring). input_ids/position_ids [R, L]; attention_mask [R, 1, L, L]
    bool (True: may attend); gather_index [B, T]: for completion token t of row b, the flat index into
    the [R * L] positions of the hidden state that predicts it (the prompt's last position for t = 0);
    completion_ids/completion_mask [B, T] as in `collate`; prompt_order: the first row of each tree (one
    per distinct prompt, or more with `hidden_size`), in the order the trees' prompts appear in the
    flattened [R * L] positions, and tree_spans their (row, offset, prompt length, length); prompt_mask
    [R, L]: the prompts' positions. Per-prompt inputs beyond the ids (a vision model's images) are ordered
    by prompt_order (rtpo.vision.packed_images); `keys` then tells which prompts are the same. Every prompt must hold at least
    one token. With `hidden_size` (the model's), a group whose completions are long against its prompt is
    laid out as several trees (`tree_completions`); without, one tree per distinct prompt."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("pack: every prompt needs at least one token (its last position predicts the first "
                         "completion token)")
    B = len(prompts)
    T = max(max((len(c) for c in completions), default=0), 1)
    trees = _trees(prompts, share_prefix, keys)
    if share_prefix and hidden_size:
        trees = _split_trees(trees, completions, hidden_size)
    # a completion's last token is left out of the rows: nothing attends to it but itself and its output
    # predicts nothing, so each completion takes len - 1 positions
    sizes = [len(p) + sum(max(len(completions[i]) - 1, 0) for i in rows) for p, rows in trees]
    place, R, L = _first_fit(sizes)
    ids = np.full((R, L), pad_id, dtype=np.int64)
    pos = np.zeros((R, L), dtype=np.int64)
    tree = np.full((R, L), -1, dtype=np.int64)   # which tree a position belongs to (-1: padding)
    seg = np.zeros((R, L), dtype=np.int64)       # 0: the prompt, s: the tree's s-th completion
    gather = np.zeros((B, T), dtype=np.int64)
    cids = np.full((B, T), pad_id, dtype=np.int64)
    cmask = np.zeros((B, T), dtype=np.float32)
    for t, (p, rows) in enumerate(trees):
        r, o = place[t]
        P = len(p)
        ids[r, o:o + P], pos[r, o:o + P], tree[r, o:o + P] = p, np.arange(P), t
        cur = o + P
        for s, i in enumerate(rows, 1):
            c, n = completions[i], len(completions[i])
            if not n:
                continue
            k = n - 1  # positions taken: all but the last token
            ids[r, cur:cur + k], pos[r, cur:cur + k], tree[r, cur:cur + k], seg[r, cur:cur + k] = c[:k], np.arange(P, P + k), t, s
            gather[i, 0] = r * L + o + P - 1
            gather[i, 1:n] = r * L + cur + np.arange(k)
            cids[i, :n], cmask[i, :n] = c, 1
            cur += k
    tree_t, seg_t = torch.from_numpy(tree), torch.from_numpy(seg)
    same_tree = (tree_t[:, :, None] == tree_t[:, None, :]) & (tree_t[:, :, None] >= 0)
    visible = (seg_t[:, None, :] == 0) | (seg_t[:, :, None] == seg_t[:, None, :])  # the prompt, or its own tokens
    causal = torch.ones((L, L), dtype=torch.bool).tril()
    # padding attends to itself only: a query row with no key would turn into NaN inside SDPA
    attn = (same_tree & visible & causal) | torch.eye(L, dtype=torch.bool)
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": attn[:, None], "position_ids": torch.from_numpy(pos),
           "gather_index": torch.from_numpy(gather), "completion_ids": torch.from_numpy(cids),
           "completion_mask": torch.from_numpy(cmask), "prompt_mask": (tree_t >= 0) & (seg_t == 0)}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    order = sorted(range(len(trees)), key=lambda t: place[t])
    out["prompt_order"] = [trees[t][1][0] for t in order]
    out["tree_spans"] = [(*place[t], len(trees[t][0]), sizes[t]) for t in order]  # (row, offset, prompt len, length)
    return out


def packing_problem(model, longest: int) -> str | None:
    """Why `model` cannot take the packed layout for rows of up to `longest` positions (None: it can).
    The 4D mask replaces the model's own masks, so attention kernels that take no mask, and sliding
    windows shorter than a row, are left to the padded layout."""
    cfg = model.config
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in PACKED_ATTENTION:
        return f"attention implementation {impl!r} takes no custom mask"
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    uses_window = ("sliding_attention" in types) if types else bool(window)
    if uses_window and isinstance(window, int) and longest > window:
        return f"sliding window of {window} positions is shorter than a row ({longest})"
    return None


def make_batch(model, prompts: list, completions: list, pad_id: int, device=None, *, packing: bool = True,
               share_prefix: bool = True, images: list | None = None) -> dict:
    """`pack` where the model can take it (`packing_problem`), else `collate`. `images`: per row, its
    processed images (rtpo.vision.ImageInputs) or None; rows share a tree only if they share their images."""
    images = images if images is not None and any(x is not None for x in images) else None
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    if packing and packing_problem(model, longest) is None:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        # rows of one prompt share its tree only if they share its images too (same ids, other pixels)
        keys = None if images is None else [(tuple(p), id(x)) for p, x in zip(prompts, images)]
        batch = pack(prompts, completions, pad_id, device, share_prefix=share_prefix, keys=keys,
                     hidden_size=getattr(cfg, "hidden_size", None))
        if images is not None:  # each tree's images once, in the order their image tokens appear in the rows
            batch.update(packed_images(model, batch, prompts, images, device))
        return batch
    return collate(prompts, completions, pad_id, device, images=images)


def _has_custom_head(model) -> bool:
    # Models that rescale or soft-cap logits after the head: take the plain logits path.
    cfg = model.config
    return bool(getattr(cfg, "final_logit_softcapping", None)) or getattr(cfg, "logit_scale", None) not in (None, 1.0)


def _packed_inputs(model, batch: dict) -> dict:
    attn = batch["attention_mask"]
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl == "eager":  # eager adds the mask to the scores
        attn = torch.zeros(attn.shape, dtype=torch.float32, device=attn.device).masked_fill(
            ~attn, torch.finfo(torch.float32).min)
    elif not torch.is_autocast_enabled(attn.device.type):
        # SDPA's CPU flash kernel runs about 15% faster with an additive mask than a boolean one (measured,
        # fwd + bwd); it must have the query's dtype, which autocast would change: autocast keeps the bool mask
        dtype = model.get_input_embeddings().weight.dtype
        attn = torch.zeros(attn.shape, dtype=dtype, device=attn.device).masked_fill(~attn, torch.finfo(dtype).min)
    return {"input_ids": batch["input_ids"], "attention_mask": attn, "position_ids": batch["position_ids"]}


def _from_logits(logits, batch, mask, temperature, with_entropy):
    logits = logits.float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1) * mask
    ent = -(logp_all.exp() * logp_all).sum(-1) * mask if with_entropy else None
    return logp, ent


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[R, L, D] per-position outputs of packed rows -> [B, T, D] at the flat positions `idx` [B, T]."""
    return x.reshape(-1, x.shape[-1]).index_select(0, idx.reshape(-1)).view(*idx.shape, -1)


def completion_logprobs(model, batch: dict, temperature: float = 1.0, with_entropy: bool = True):
    """log pi(completion token | prefix) / temperature-scaled, and the entropy of that
    distribution, [B, T] each (0 where completion_mask is 0). `batch` from `collate` or `pack`."""
    mask = batch["completion_mask"].bool()
    if "gather_index" in batch:  # packed: pick each completion token's predicting position out of the rows
        fwd, idx = _packed_inputs(model, batch), batch["gather_index"]
        if batch.get("pixel_values") is not None:  # image prompts: vision tower once per tree, M-RoPE positions
            hidden = _gather(packed_image_hidden(model, batch, fwd["attention_mask"]), idx)
        elif _has_custom_head(model):
            return _from_logits(_gather(model(**fwd).logits, idx), batch, mask, temperature, with_entropy)
        else:
            hidden = _gather(model.get_decoder()(**fwd).last_hidden_state, idx)
    elif batch.get("pixel_values") is not None:  # image prompts: vision tower + decoder with M-RoPE positions
        hidden = prompt_image_hidden(model, batch)[:, batch["prompt_len"] - 1:-1]
    else:
        P = batch["prompt_len"]
        fwd = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        if _has_custom_head(model):
            return _from_logits(model(**fwd).logits[:, P - 1:-1], batch, mask, temperature, with_entropy)
        hidden = model.get_decoder()(**fwd).last_hidden_state[:, P - 1:-1]
    head = model.get_output_embeddings()
    return linear_logprobs(hidden, head.weight, batch["completion_ids"], getattr(head, "bias", None),
                           temperature=temperature, mask=mask, return_entropy=with_entropy)


# ----------------------------------------------------------------------------- micro batches by tokens

def mini_batches(n_rows: int, parts: int) -> list:
    """The update's mini batches: `parts` consecutive, near-equal slices of a step's `n_rows` rows
    (numpy's array_split sizes; empty slices dropped)."""
    return [[int(i) for i in s] for s in np.array_split(np.arange(n_rows), parts) if len(s)]


def micro_batches(rows: list, costs, optim, gas: int | None) -> list:
    """Mini batch `rows` cut into consecutive micro batches: optim.micro_batch_size rows each, or with
    optim.micro_batch_tokens at most that many tokens each (`costs(rows)`: each row's tokens). Under a
    backend that fixes the count (`gas`: DDP / DeepSpeed run collectives in every backward) the token
    budget is not a cap but a balance: exactly `gas` runs, cut where the tokens are most even."""
    if optim.micro_batch_tokens <= 0:
        m = optim.micro_batch_size
        return [rows[i:i + m] for i in range(0, len(rows), m)]
    return split_even(rows, costs(rows), gas) if gas else split_by_tokens(rows, costs(rows), optim.micro_batch_tokens)


def row_tokens(prompts: list, completions: list, rows: list, share_prefix: bool = True) -> list:
    """What each of `rows` (in order) adds to a packed batch: its completion, plus its prompt unless
    the previous row has the same prompt (a group's rows are consecutive, so they share it)."""
    out, prev = [], None
    for i in rows:
        p = prompts[i]
        shared = share_prefix and prev is not None and (p is prev or p == prev)
        out.append(len(completions[i]) + (0 if shared else len(p)))
        prev = p
    return out


def split_by_tokens(rows: list, costs: list, budget: int) -> list:
    """Consecutive runs of `rows` of at most `budget` tokens each (a row over budget goes alone)."""
    out, cur, used = [], [], 0
    for i, c in zip(rows, costs):
        if cur and used + c > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += c
    return out + [cur] if cur else out


def split_even(rows: list, costs: list, parts: int) -> list:
    """Exactly `parts` (<= len(rows)) consecutive runs of `rows`, the largest run's tokens as small as the
    consecutive order allows: the smallest budget that `split_by_tokens` fits into at most `parts` runs,
    then the runs with most rows halved until there are `parts`."""
    if not 0 < parts <= len(rows):
        raise ValueError(f"split_even: cannot cut {len(rows)} rows into {parts} non-empty runs")
    lo, hi = max(costs), sum(costs)
    while lo < hi:  # the number of runs falls as the budget grows
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(split_by_tokens(rows, costs, mid)) <= parts else (mid + 1, hi)
    runs = split_by_tokens(rows, costs, lo)
    while len(runs) < parts:
        k = max(range(len(runs)), key=lambda j: len(runs[j]))
        runs[k:k + 1] = [runs[k][:len(runs[k]) // 2], runs[k][len(runs[k]) // 2:]]
    return runs
