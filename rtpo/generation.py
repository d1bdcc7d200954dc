"""The rollout engine: a KV-cached, batched sampling loop over a transformers causal LM.

One call prefills every prompt once, then feeds one token per row per forward through the KV cache.
`model.generate` is not used. Invariants:

- Rows are LEFT padded. Position ids count real tokens only (a row's first real token is at 0) and the
  attention mask hides the padding, so a padded row computes what its prompt computes alone.
- Output row r is prompt r // num_samples, sample r % num_samples.
- Randomness: one uniform per (step, row), drawn up front from `generator` as a [max_new_tokens, rows]
  table and spent by inverse-CDF sampling. A row's tokens depend only on its own logits and its own
  uniforms, never on which rows share its batch, so prefix sharing, compaction and `batch_size`
  chunking leave sampled outputs unchanged, and the generator always advances by the same amount
  (a resumed run draws the same numbers).
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import torch

from rtpo.vision import batch_images, mrope_positions

log = logging.getLogger(__name__)

# Compact the batch once this fraction of its rows has finished (compact="auto"). Measured on CPU
# (benchmarks/bench_generation.py, "compaction" table): a compaction costs about one cache copy, less
# than a decode step, and decode cost is close to linear in rows, so dropping finished rows pays as
# soon as a quarter of them are idle; a lower threshold compacts more often for little extra gain.
AUTO_COMPACT_FRACTION = 0.25
# Under torch.compile every new batch size is a recompile (and a new CUDA graph): halve at most.
AUTO_COMPACT_FRACTION_COMPILED = 0.5
# Under torch.compile the static cache length is rounded up to a multiple of this.
STATIC_LEN_MULTIPLE = 128


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0      # 0 -> greedy (argmax)
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1.0 = off
    eos_token_ids: tuple = ()     # any of these ends a row (the EOS token IS included in the completion)
    stop_strings: tuple = ()      # a row ends once its decoded completion contains one; needs tokenizer
    pad_token_id: int = 0


@dataclass
class GenerationOutput:
    completions: list  # list[list[int]]: row r = prompt r // num_samples, sample r % num_samples
    finish_reasons: list  # list[str]: "eos" | "stop" | "length"
    stats: dict = field(default_factory=dict)
    # with return_logprobs: list[list[float]], the sampler's log-prob of each generated token under
    # the temperature-scaled distribution log_softmax(logits / T) (top-k/top-p truncation not applied),
    # the quantity the trainer's log-prob pass computes, in the rollout's own numerics
    logprobs: list | None = None


# ----------------------------------------------------------------------------- sampling

def process_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """float32 [B, V] logits -> temperature, then top-k, then top-p, as transformers' warpers do.

    Removed tokens get -inf. Ties at the top-k boundary are kept; top-p keeps the smallest set of most
    likely tokens whose mass exceeds top_p (at least one token)."""
    logits = logits.float()
    if sampling.temperature not in (0.0, 1.0):
        logits = logits / sampling.temperature
    V = logits.shape[-1]
    if 0 < sampling.top_k < V:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        # Same arithmetic as transformers' TopPLogitsWarper: ascending sort, drop the low tail whose
        # cumulative mass is <= 1 - top_p, never the most likely token.
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - sampling.top_p
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, sampling: SamplingConfig, u: torch.Tensor | None) -> torch.Tensor:
    """[B, V] logits, [B] uniforms in [0, 1) -> [B] token ids. Greedy (argmax) when temperature == 0.

    Inverse-CDF sampling: row b picks the first token whose cumulative (unnormalised) probability
    exceeds u[b] * total. It spends exactly one uniform per row, so a row's draw is independent of the
    other rows in the batch. Tokens with zero probability are never picked."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = process_logits(logits, sampling)
    p = (logits - logits.max(-1, keepdim=True).values).exp()
    cdf = p.double().cumsum(-1)  # float64: no drift over a 150k-token vocabulary
    total = cdf[:, -1:].contiguous()
    idx = torch.searchsorted(cdf, u.to(cdf.device, cdf.dtype)[:, None] * total, right=True)
    # u * total can round up to total, which would index past the vocabulary; clamp to the last
    # token with nonzero probability (the first index where the cdf reaches its total).
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(idx, last).squeeze(-1)


# ----------------------------------------------------------------------------- model calls

_SIG_CACHE: dict = {}


def _forward_kwargs(model) -> dict:
    """Static kwargs for model(...): the cache argument's name and logits_to_keep where supported.

    transformers 5.x names the cache `cache` (with `past_key_values` deprecated); 4.x only knows
    `past_key_values`. logits_to_keep=1 avoids a [B, P, vocab] logits tensor at prefill."""
    key = type(model)
    if key not in _SIG_CACHE:
        params = inspect.signature(model.forward).parameters
        kw = {"cache_arg": "cache" if "cache" in params else "past_key_values"}
        if "logits_to_keep" in params:
            kw["logits_to_keep"] = 1
        _SIG_CACHE[key] = kw
    return _SIG_CACHE[key]


def _forward(model, ids, pos, mask, kv, extra=None) -> torch.Tensor:
    """Float32 logits of the last position, [B, V]; `kv` is updated in place. `extra`: more model inputs
    (the prefill's pixel_values / image_grid_thw)."""
    kw = dict(_forward_kwargs(model))
    kw[kw.pop("cache_arg")] = kv
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw, **(extra or {}))
    return out.logits[:, -1].float()


_WARNED: set = set()


def _log_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning(msg)


# Device types on which compile=True compiles. CPU is left out: compiling takes minutes there and
# buys little (adding "cpu" here is how the compiled path is exercised without a GPU).
COMPILE_DEVICES = ("cuda",)
_COMPILED: dict = {}


def _decode_step_fn(compile: bool, device: torch.device):
    """The decode-step callable: `_forward` itself, or its torch.compile'd version."""
    if not compile:
        return _forward
    if device.type not in COMPILE_DEVICES:
        _log_once(f"generate(compile=True): torch.compile of the decode step is GPU-only; "
                  f"running eager on {device.type}")
        return _forward
    if device.type not in _COMPILED:
        # CUDA: reduce-overhead = CUDA graphs (the static cache's buffers are static addresses).
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        _COMPILED[device.type] = torch.compile(_forward, mode=mode)
    return _COMPILED[device.type]


# ----------------------------------------------------------------------------- KV cache

def _new_dynamic_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)  # per-layer types (sliding windows) from the config
    except TypeError:
        return DynamicCache()


def _map_kv(kv, fn) -> None:
    """Replace every layer's keys/values [B, kv_heads, S, head_dim] by fn(tensor) (a batch-dim op)."""
    for layer in kv.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue  # an uninitialised layer holds no rows
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)
        if hasattr(layer, "batch_size"):
            layer.batch_size = layer.keys.shape[0]
        if getattr(layer, "is_compileable", False) and layer.keys.is_cuda:
            # New buffers: CUDA graphs must see them as fixed addresses again.
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)


def _to_static(model, kv, max_len: int):
    """A StaticCache (preallocated [B, kv_heads, max_len, head_dim] buffers, written in place each
    step) holding the prefilled dynamic cache `kv` in slots [0, S)."""
    from transformers import StaticCache

    static = StaticCache(config=model.config, max_cache_len=max_len)
    for src, dst in zip(kv.layers, static.layers):
        dst.update(src.keys, src.values)  # allocates the buffers, then writes slots [0, S)
    return static


# ----------------------------------------------------------------------------- the loop

def _left_pad(prompts: list, pad_id: int, device) -> tuple:
    """(ids, mask, pos), each [n, P]; positions count real tokens from 0 (padding gets 0)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _stop_window(sampling: SamplingConfig) -> int:
    """Tokens to decode when checking stop strings. A stop string completed by the newest token lies
    in the last 4 * len(s) tokens (a token decodes to at least one byte, a char is at most 4 bytes);
    2 more absorb decode artefacts at the window's start (stripped leading spaces, split bytes)."""
    return 4 * max(len(s) for s in sampling.stop_strings) + 2


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Batch:
    """The rows decoded together. Every per-row field is aligned on dim 0 (B rows), cache included."""
    kv: object               # KV cache: [B, kv_heads, slots, head_dim] per layer
    attn: torch.Tensor       # [B, slots] long: 1 iff the cache slot holds a real token
    next_pos: torch.Tensor   # [B] position id of the next token fed
    rows: list               # global output row of each batch row
    P: int                   # padded prompt length: the token fed at step t goes to slot P + t - 1


def _prefill(model, prompts, row0, G, sampling, *, share_prefix, cache, compiled, device, images=None) -> tuple:
    """Run the prompts through the model once -> (_Batch of len(prompts) * G rows, [B, V] logits).

    With share_prefix each distinct prompt is prefilled once and its KV cache replicated G times
    (rows r*G .. r*G+G-1 continue prompt r; its images are encoded once); without, each of its G copies
    is prefilled. `images`: per prompt, its rtpo.vision.ImageInputs or None."""
    T = sampling.max_new_tokens
    ids, mask, pos = _left_pad(prompts, sampling.pad_token_id, device)
    if not share_prefix:
        ids, mask, pos = (x.repeat_interleave(G, 0) for x in (ids, mask, pos))
        images = None if images is None else [x for x in images for _ in range(G)]
    extra = batch_images(images, device) if images is not None else {}
    if extra:  # M-RoPE: 3-D positions from the model; decoding continues at real tokens + rope delta
        pos, delta = mrope_positions(model, ids, mask, extra["image_grid_thw"])
        next_pos = mask.sum(-1) + delta
    else:
        next_pos = pos[:, -1] + 1
    kv = _new_dynamic_cache(model)
    logits = _forward(model, ids, pos, mask, kv, extra)
    if share_prefix and G > 1:
        logits, mask, next_pos = (x.repeat_interleave(G, 0) for x in (logits, mask, next_pos))
        _map_kv(kv, lambda t: t.repeat_interleave(G, 0))
    B, P = mask.shape
    slots = P + T - 1  # the last sampled token is never fed
    if compiled:  # round up (extra slots stay masked): nearby prompt lengths share one graph
        slots = -(-slots // STATIC_LEN_MULTIPLE) * STATIC_LEN_MULTIPLE
    attn = torch.zeros((B, slots), dtype=torch.long, device=device)
    attn[:, :P] = mask
    if cache == "static" and T > 1:
        kv = _to_static(model, kv, slots)
    return _Batch(kv, attn, next_pos, list(range(row0, row0 + B)), P), logits


def _compact(batch: _Batch, keep: list) -> torch.Tensor:
    """Keep only batch rows `keep` (cache included); returns the index tensor for other per-row tensors."""
    idx = torch.tensor(keep, device=batch.attn.device)
    _map_kv(batch.kv, lambda x: x.index_select(0, idx))
    batch.attn, batch.next_pos = batch.attn[idx], batch.next_pos[idx]
    batch.rows = [batch.rows[i] for i in keep]
    return idx


def _stop_string_hits(tokenizer, sampling, completions: list, window: int) -> list:
    """Which of these completions contain a stop string in their last `window` tokens."""
    texts = tokenizer.batch_decode([c[-window:] for c in completions], skip_special_tokens=False)
    return [any(s in text for s in sampling.stop_strings) for text in texts]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B] log-probs of `tokens` under log_softmax(logits / temperature) (temperature 0 reads as 1)."""
    t = temperature if temperature > 0 else 1.0
    logits = logits.float() / t if t != 1.0 else logits.float()
    return torch.log_softmax(logits, -1).gather(-1, tokens[:, None].to(logits.device)).squeeze(-1)


def _generate_chunk(model, prompts, row0, G, sampling, uniforms, out, stats, *, tokenizer,
                    share_prefix, cache, step_fn, compact_at, compiled, device, images=None) -> None:
    """Generate rows row0 .. row0 + len(prompts) * G - 1 into out["completions"] / out["reasons"]
    (and out["logprobs"] when it is a list)."""
    T = sampling.max_new_tokens
    completions, reasons, logprobs = out["completions"], out["reasons"], out.get("logprobs")
    eos = set(sampling.eos_token_ids)
    window = _stop_window(sampling) if sampling.stop_strings else 0

    t0 = time.perf_counter()
    batch, logits = _prefill(model, prompts, row0, G, sampling, share_prefix=share_prefix, cache=cache,
                             compiled=compiled, device=device, images=images)
    _sync(device)
    stats["prefill_s"] += time.perf_counter() - t0
    stats["prefill_tokens"] += (len(prompts) if share_prefix else len(prompts) * G) * batch.P
    stats["forward_passes"] += 1

    t0 = time.perf_counter()
    done = [False] * len(batch.rows)
    for t in range(T):
        if t > 0:
            P = batch.P
            batch.attn[:, P + t - 1] = 1
            # The static cache attends over all its slots (unwritten ones masked); the dynamic one
            # holds exactly P + t slots after this step's write.
            mask = batch.attn if cache == "static" else batch.attn[:, :P + t]
            logits = step_fn(model, last[:, None], batch.next_pos[:, None], mask, batch.kv)
            batch.next_pos = batch.next_pos + 1
            stats["forward_passes"] += 1
            stats["row_steps"] += len(batch.rows)
        u = None if uniforms is None else uniforms[t, torch.tensor(batch.rows, device=uniforms.device)]
        tok = sample_tokens(logits, sampling, u)
        lps = token_logprobs(logits, tok, sampling.temperature).tolist() if logprobs is not None else None
        for i, (r, tk) in enumerate(zip(batch.rows, tok.tolist())):
            if not done[i]:  # finished rows ride along until compaction; their tokens are dropped
                completions[r].append(tk)
                if lps is not None:
                    logprobs[r].append(lps[i])
                if tk in eos:
                    done[i], reasons[r] = True, "eos"
        if window:
            live = [i for i, d in enumerate(done) if not d]
            hits = _stop_string_hits(tokenizer, sampling, [completions[batch.rows[i]] for i in live], window)
            for i in (i for i, h in zip(live, hits) if h):
                done[i], reasons[batch.rows[i]] = True, "stop"
        n_done = sum(done)
        if n_done == len(done) or t == T - 1:
            break
        last = tok.masked_fill(torch.tensor(done, device=device), sampling.pad_token_id)
        if n_done and n_done >= compact_at * len(done):
            last = last[_compact(batch, [i for i, d in enumerate(done) if not d])]
            done = [False] * len(batch.rows)
            stats["compactions"] += 1
    _sync(device)
    stats["decode_s"] += time.perf_counter() - t0


def _compact_fraction(compact, compiled: bool) -> float:
    """Finished fraction of the batch that triggers a compaction (inf = never)."""
    if compact is False:
        return float("inf")
    if compact is True:
        return 0.0  # any finished row
    if compact == "auto":
        return AUTO_COMPACT_FRACTION_COMPILED if compiled else AUTO_COMPACT_FRACTION
    if isinstance(compact, float) and 0.0 <= compact <= 1.0:
        return compact
    raise ValueError(f"compact must be True, False, 'auto' or a fraction in [0, 1], got {compact!r}")


def _validate(prompts, sampling, num_samples, tokenizer, cache) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
        raise ValueError(f"bad sampling config: {sampling}")
    if sampling.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")


def draw_uniforms(sampling: SamplingConfig, rows: int, generator: torch.Generator | None = None):
    """The [max_new_tokens, rows] uniform table `generate` samples with (None when greedy or empty)."""
    if sampling.temperature <= 0 or sampling.max_new_tokens <= 0 or rows == 0:
        return None
    gen_device = generator.device if generator is not None else "cpu"
    return torch.rand((sampling.max_new_tokens, rows), generator=generator, dtype=torch.float64, device=gen_device)


@torch.no_grad()
def generate(model, prompts: list, sampling: SamplingConfig, *, num_samples: int = 1,
             generator: torch.Generator | None = None, tokenizer=None, share_prefix: bool = True,
             cache: str = "dynamic", compile: bool = False, compact: bool | str | float = "auto",
             batch_size: int | None = None, uniforms: torch.Tensor | None = None,
             return_logprobs: bool = False, images: list | None = None) -> GenerationOutput:
    """Sample num_samples completions for every prompt (lists of token ids).

    share_prefix: prefill each prompt once and replicate its KV cache for its samples.
    cache: "dynamic" (grows by concatenation) or "static" (preallocated, written in place).
    compile: torch.compile the decode step (CUDA only; implies the static cache; eager elsewhere).
    compact: drop finished rows from the batch: True (as soon as any finishes), False, "auto"
        (AUTO_COMPACT_FRACTION) or a fraction of the batch.
    batch_size: most rows decoded at once; prompts are processed in chunks of whole groups (at least
        one group per chunk).
    uniforms: a [max_new_tokens, rows] table to sample with instead of drawing one from `generator`;
        a data-parallel process passes its columns of the table `draw_uniforms` gives for the whole
        batch, so that its rows sample exactly what one process sampling the whole batch would.
    return_logprobs: also return each generated token's log-prob under the sampler's own forward
        (`GenerationOutput.logprobs`): one log_softmax per step, for truncated importance sampling.
    images: per prompt, its rtpo.vision.ImageInputs (pixel_values, image_grid_thw) or None; the prompt
        holds the matching image tokens. They enter the prefill only (with M-RoPE 3-D positions).
    The model's train/eval mode and dtype are left as they are."""
    _validate(prompts, sampling, num_samples, tokenizer, cache)
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"images must have one entry per prompt ({len(prompts)}), got {len(images)}")
    device = next(model.parameters()).device
    G, T = num_samples, sampling.max_new_tokens
    N = len(prompts) * G
    out = {"completions": [[] for _ in range(N)], "reasons": ["length"] * N}
    if return_logprobs:
        out["logprobs"] = [[] for _ in range(N)]
    stats = {k: 0 for k in ("prefill_s", "decode_s", "forward_passes", "prefill_tokens",
                            "row_steps", "compactions", "chunks")}
    if T <= 0 or N == 0:
        return GenerationOutput(out["completions"], out["reasons"], stats, out.get("logprobs"))

    compiled = compile and device.type in COMPILE_DEVICES
    if compiled and cache != "static":
        _log_once("generate(compile=True): using the static KV cache (a growing cache recompiles each step)")
        cache = "static"
    step_fn = _decode_step_fn(compile, device)
    compact_at = _compact_fraction(compact, compiled)
    # One uniform per (step, row), drawn whatever happens later: see the module docstring.
    if sampling.temperature <= 0:
        uniforms = None
    elif uniforms is not None:
        if tuple(uniforms.shape) != (T, N):
            raise ValueError(f"uniforms must be [max_new_tokens, rows] = [{T}, {N}], got {list(uniforms.shape)}")
        uniforms = uniforms.to(device, torch.float64)
    else:
        uniforms = draw_uniforms(sampling, N, generator).to(device)

    per_chunk = len(prompts) if batch_size is None else max(1, batch_size // G)
    for start in range(0, len(prompts), per_chunk):
        _generate_chunk(model, prompts[start:start + per_chunk], start * G, G, sampling, uniforms, out,
                        stats, tokenizer=tokenizer, share_prefix=share_prefix, cache=cache,
                        step_fn=step_fn, compact_at=compact_at, compiled=compiled, device=device,
                        images=None if images is None else images[start:start + per_chunk])
        stats["chunks"] += 1
    stats["tokens_generated"] = sum(len(c) for c in out["completions"])
    stats["compiled"] = compiled
    return GenerationOutput(out["completions"], out["reasons"], stats, out.get("logprobs"))
