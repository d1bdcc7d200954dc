"""Images in prompts (Qwen2-VL style vision-language models).

A dataset row may carry images (data.image_field: a path, bytes, a PIL image, a datasets Image dict, or a
list of those). They are decoded once when the rows are read (a bad image is a DataError naming the row),
and a prompt holds each image as <|vision_start|> + N x <|image_pad|> + <|vision_end|>, N = the image's
merged patches. The pixels become model inputs (`ImageInputs`: pixel_values, image_grid_thw) through
the model's image processor only when a batch is built, so a dataset's worth of pixel tensors never sits
in memory.

Positions: Qwen2-VL's M-RoPE gives every token a (time, height, width) position; text tokens have three
equal components, image tokens a 2-D grid, and the text after an image continues from the largest
position so far. `mrope_positions` asks the model itself (`get_rope_index`), so the rollout's prefill,
its decode steps (next position = real tokens + the model's rope delta) and the log-prob pass over
[prompt | completion] all place every token exactly as transformers does.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import torch

IMAGE_FIELDS_AUTO = ("image", "images")  # data.image_field = auto: the first of these a row has
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"  # one image, for prompts without a chat template


class ImageError(ValueError):
    """An image cannot be read; the message names what and why (rtpo.data turns it into a DataError)."""


# --- reading images -----------------------------------------------------------------------------------
def load_image(value, base_dir: str | None = None):
    """One image as a loaded RGB PIL image. `value`: a PIL image, bytes, a file path (relative paths are
    looked up in `base_dir` first), or a dict with "bytes" / "path" (how `datasets` stores an Image)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(value))) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageError(f"image bytes cannot be decoded ({len(value)} bytes; {type(e).__name__}: "
                             f"{' '.join(str(e).split())})") from None
    if isinstance(value, str):
        path = value
        if base_dir and not os.path.isabs(path) and os.path.exists(os.path.join(base_dir, path)):
            path = os.path.join(base_dir, path)
        if not os.path.isfile(path):
            where = f" (also looked in {base_dir})" if base_dir and not os.path.isabs(value) else ""
            raise ImageError(f"image file {value!r} does not exist{where}")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageError(f"image file {value!r} cannot be read as an image ({type(e).__name__}: "
                             f"{' '.join(str(e).split())})") from None
    raise ImageError(f"expected an image path, bytes or a PIL image, got {type(value).__name__}")


def load_images(value, base_dir: str | None = None) -> tuple:
    """A row's images: one image or a list of them; None or [] is a row without images."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    return tuple(load_image(v, base_dir) for v in items if v is not None)


def image_digest(images) -> str:
    """A short hash of the pixels: rows that share a question are told apart by their images."""
    if not images:
        return ""
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.mode}{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()[:16]


def image_field(cfg_field: str, row: dict) -> str | None:
    """The column holding a row's images: data.image_field, or for "auto" the first of image/images the
    row has; None for "none" (images ignored) or when auto finds neither."""
    if cfg_field in ("none", ""):
        return None
    if cfg_field == "auto":
        return next((f for f in IMAGE_FIELDS_AUTO if f in row), None)
    return cfg_field


# --- model inputs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageInputs:
    """One prompt's images as the model takes them."""
    pixel_values: torch.Tensor    # [patches of all its images, channels * temporal * patch * patch]
    image_grid_thw: torch.Tensor  # [images, 3] patch grid (time, height, width) of each image


class VisionProcessor:
    """The model's image processor plus what the prompts need from the tokenizer: the image token and how
    many of them one image takes (its patch grid / merge_size^2, as Qwen2VLProcessor counts them)."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor = image_processor
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no image token {self.image_token!r}")
        self.merge = int(getattr(image_processor, "merge_size", 1) or 1)

    def process(self, images) -> ImageInputs:
        out = self.image_processor(images=list(images), return_tensors="pt")
        return ImageInputs(out["pixel_values"].float(), out["image_grid_thw"].long())

    def token_counts(self, images) -> list:
        """Image tokens each image takes in a prompt."""
        ip = self.image_processor
        if hasattr(ip, "get_number_of_image_patches"):  # from the size alone, no pixels processed
            return [ip.get_number_of_image_patches(im.height, im.width, {}) // self.merge ** 2 for im in images]
        grid = self.process(images).image_grid_thw
        return (grid.prod(-1) // self.merge ** 2).tolist()

    def expand(self, ids: list, counts: list) -> list:
        """Token ids with the k-th image token repeated counts[k] times (a chat template writes one per image)."""
        out, k = [], 0
        for t in ids:
            if t == self.image_token_id:
                if k >= len(counts):
                    raise ValueError(f"the prompt has more image tokens than its {len(counts)} image(s)")
                out += [t] * counts[k]
                k += 1
            else:
                out.append(t)
        if k != len(counts):
            raise ValueError(f"the chat template wrote {k} image token(s) for {len(counts)} image(s)")
        return out

    def save_pretrained(self, folder: str) -> None:
        self.image_processor.save_pretrained(folder)


def processor_chat_template(path: str, **kw) -> str | None:
    """The chat template a VLM's processor keeps beside its tokenizer (chat_template.json, written by
    ProcessorMixin), for a tokenizer saved without one; None when there is none."""
    import json

    from transformers.utils import cached_file

    try:
        f = cached_file(path, "chat_template.json", _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False, **kw)
    except (OSError, ValueError):
        return None
    if not f:
        return None
    with open(f, encoding="utf-8") as fh:
        return json.load(fh).get("chat_template")


def is_vision_model(model) -> bool:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "vision_config", None) is not None and getattr(cfg, "image_token_id", None) is not None


def vision_trunk(model):
    """The multimodal trunk (vision tower + decoder: Qwen2VLModel and kin) inside `model`, whatever wraps
    it (PEFT, DeepSpeed's module): `get_decoder()` would give the text decoder alone."""
    for m in model.modules():
        if hasattr(m, "get_rope_index") and hasattr(m, "language_model"):
            return m
    raise ValueError(f"{type(model).__name__} has no vision-language trunk (get_rope_index); images need a "
                     "Qwen2-VL style model")


def freeze_encoder(model, freeze: bool):
    """model.freeze_vision_encoder: no gradient for a VLM's vision encoder (warm-start and RL) -> model."""
    if freeze:
        for p in vision_encoder_parameters(model):
            p.requires_grad_(False)
    return model


def vision_encoder_parameters(model) -> list:
    """The vision encoder's parameters (patch embedding and blocks: the vision tower without its merger,
    which maps its features into the language model); [] for a text-only model."""
    if not is_vision_model(model):
        return []
    visual = vision_trunk(model).visual
    return [p for n, p in visual.named_parameters() if not n.startswith("merger.")]


def batch_images(per_row: list, device=None) -> dict:
    """{pixel_values, image_grid_thw} of the rows' images in row order ({} when no row has any): the order
    in which the model fills the batch's image tokens."""
    present = [x for x in per_row if x is not None]
    if not present:
        return {}
    out = {"pixel_values": torch.cat([x.pixel_values for x in present]),
           "image_grid_thw": torch.cat([x.image_grid_thw for x in present])}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def image_token_mask(input_ids: torch.Tensor, image_token_id: int, prompt_len: int | None = None) -> torch.Tensor:
    """[B, L] bool: the image tokens of the prompts (the first prompt_len columns). A completion may sample
    the image token like any other; it is text there (no pixels behind it), as in the decode step."""
    mask = input_ids == image_token_id
    if prompt_len is not None:
        mask[:, prompt_len:] = False
    return mask


def mrope_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor,
                    prompt_len: int | None = None):
    """([3, B, L] M-RoPE position ids, [B] rope deltas) from the model's own get_rope_index; padding
    (attention_mask 0) is skipped, so left and right padding both work. A row's next position after its
    n real tokens is n + delta. Image tokens after prompt_len (in completions) count as text."""
    trunk = vision_trunk(model)
    # 1 = image token, 0 = text (videos are not supported)
    mm_types = image_token_mask(input_ids, trunk.config.image_token_id, prompt_len).int()
    pos, deltas = trunk.get_rope_index(input_ids, mm_token_type_ids=mm_types, image_grid_thw=image_grid_thw,
                                       attention_mask=attention_mask)
    return pos, deltas.view(-1).to(input_ids.device)


def prompt_image_hidden(model, batch: dict) -> torch.Tensor:
    """[B, L, H] last hidden states of a collated [prompt | completion] batch with images: the images'
    features fill the prompts' image tokens, then the decoder runs with M-RoPE positions. As the model's
    own forward, except that an image token sampled in a completion stays text (the model's forward would
    count it as an image placeholder and fail on the mismatch)."""
    trunk = vision_trunk(model)
    ids, attn, P = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
    pos, _ = mrope_positions(model, ids, attn, batch["image_grid_thw"], prompt_len=P)
    embeds = _image_embeddings(trunk, batch, image_token_mask(ids, trunk.config.image_token_id, P))
    return trunk.language_model(inputs_embeds=embeds, attention_mask=attn, position_ids=pos).last_hidden_state


def _image_embeddings(trunk, batch: dict, where: torch.Tensor) -> torch.Tensor:
    """The input embeddings of batch["input_ids"], the image features (one per image token, in order) put
    at the positions `where` [B, L] marks: the prompts' image tokens."""
    embeds = trunk.get_input_embeddings()(batch["input_ids"])
    feats = trunk.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True).pooler_output
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    if int(where.sum()) != feats.shape[0]:
        raise ValueError(f"the prompts hold {int(where.sum())} image tokens but their images give {feats.shape[0]} "
                         "features")
    return embeds.masked_scatter(where[..., None], feats.to(embeds.dtype))


def packed_images(model, batch: dict, prompts: list, images: list, device=None) -> dict:
    """For a packed batch (rtpo.logprobs.pack) whose prompts carry images: each tree's images once, in
    the order the trees' image tokens appear in the flattened rows (pixel_values, image_grid_thw), and
    the [3, R, L] M-RoPE positions: a tree's prompt takes the positions the model's get_rope_index gives
    it alone; its completions continue as text from the prompt's next position (n + rope delta), each
    restarting there, as in the padded layout."""
    pos1 = batch["position_ids"]
    pos = pos1.unsqueeze(0).repeat(3, 1, 1)
    for first, (r, o, P, n) in zip(batch["prompt_order"], batch["tree_spans"]):
        x = images[first]
        if x is None:  # a text prompt in an image batch: its positions are plain text positions
            continue
        ids = torch.tensor([prompts[first]], device=pos1.device)
        p3, delta = mrope_positions(model, ids, torch.ones_like(ids), x.image_grid_thw.to(pos1.device))
        pos[:, r, o:o + P] = p3[:, 0].to(pos.dtype)
        pos[:, r, o + P:o + n] = pos1[r, o + P:o + n] + int(delta[0])
    out = batch_images([images[i] for i in batch["prompt_order"]], device)
    out["mrope_position_ids"] = pos
    return out


def packed_image_hidden(model, batch: dict, attention_mask) -> torch.Tensor:
    """[R, L, H] last hidden states of a packed batch with images (`packed_images`): the trees' image
    features fill their prompts' image tokens (an image token sampled in a completion stays text), then
    the decoder runs with the packed 4D mask and M-RoPE positions."""
    trunk = vision_trunk(model)
    embeds = _image_embeddings(trunk, batch, (batch["input_ids"] == trunk.config.image_token_id) & batch["prompt_mask"])
    return trunk.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                position_ids=batch["mrope_position_ids"]).last_hidden_state
