"""The embedded vision-language model (`--model embedded-vl`): a tiny random-weight Qwen2-VL, its
character-level tokenizer with the Qwen2-VL image tokens and chat template, and its image processor,
all built offline from code (like rtpo/embedded.py for the text model).

Sizes: the text model of rtpo/embedded.py (hidden 128, 4 layers, GQA 4/2 heads) plus a 2-block vision
tower (width 64, 14-pixel patches, 2x2 merge): about 1 M parameters. The image processor resizes an
image to between 56x56 and 112x112 pixels, i.e. 4 to 16 image tokens after the 2x2 merge.
"""

from __future__ import annotations

from rtpo import embedded

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
VISION_TOKENS = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
SPECIAL_TOKENS = embedded.SPECIAL_TOKENS + VISION_TOKENS

# ChatML with Qwen2-VL's image content parts: a message's content is a string, or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts; each image becomes one
# <|vision_start|><|image_pad|><|vision_end|>, which rtpo.vision expands to the image's token count.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

PATCH, MERGE, TEMPORAL = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


def build_tokenizer():
    """The embedded character tokenizer plus the four Qwen2-VL vision tokens (whole special tokens)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in embedded.CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=embedded.PAD, eos_token=embedded.EOS, unk_token="<|unk|>",
        additional_special_tokens=[embedded.BOS, embedded.THINK_OPEN, embedded.THINK_CLOSE] + VISION_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_image_processor(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    """Qwen2-VL's image processor (the PIL one: torchvision is not needed) with the tiny model's patches."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=PATCH,
                                    temporal_patch_size=TEMPORAL, merge_size=MERGE)


def build_model(tokenizer, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
                max_positions=1024, vision_width=64, vision_depth=2, seed=0):
    """A randomly initialised Qwen2VLForConditionalGeneration (tied embeddings)."""
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    head_dim = hidden_size // num_heads
    # M-RoPE splits each head's rotary frequencies over (time, height, width); the three parts sum to
    # head_dim / 2. Qwen2-VL uses [16, 24, 24] of 64; the same proportions here.
    t = head_dim // 8
    section = [t, (head_dim // 2 - t) // 2, head_dim // 2 - t - (head_dim // 2 - t) // 2]
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.convert_tokens_to_ids(embedded.BOS))
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=max_positions,
                         rope_theta=10000.0, tie_word_embeddings=True,
                         rope_scaling={"type": "mrope", "mrope_section": section}, **special),
        vision_config=dict(depth=vision_depth, embed_dim=vision_width, hidden_size=hidden_size,
                           num_heads=max(1, vision_width // 16), mlp_ratio=2, patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=3),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], tie_word_embeddings=True, **special,
    )
    return embedded.from_config(AutoModelForImageTextToText, config, tokenizer, seed)
