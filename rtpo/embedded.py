"""The embedded default: a character-level tokenizer with a chat template and a tiny Qwen2 model,
both built offline from code, so `python train.py` needs no hub."""

from __future__ import annotations

import string

import torch

PAD, BOS, EOS = "<|pad|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = [PAD, BOS, EOS, THINK_OPEN, THINK_CLOSE, "<|unk|>"]
CHARS = string.digits + string.ascii_letters + " \n+-*/=?.,:;!()'#$%&<>[]{}_\"|\\^~@`"

# ChatML, the format of Qwen2 and SmolLM2 chat models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer():
    """A PreTrainedTokenizerFast with one token per character plus whole special tokens.

    Built with the `tokenizers` library: a BPE model with an empty merge list is a character
    tokenizer; the Fuse decoder joins characters back without inserted spaces.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token="<|unk|>",
        additional_special_tokens=[BOS, THINK_OPEN, THINK_CLOSE],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_model(tokenizer, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                intermediate_size=384, max_positions=1024, seed=0):
    """A randomly initialised Qwen2ForCausalLM sized by the arguments (tied embeddings)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_positions,
        tie_word_embeddings=True, rope_theta=10000.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
    )
    return from_config(AutoModelForCausalLM, config, tokenizer, seed)


def from_config(auto_cls, config, tokenizer, seed: int):
    """`auto_cls.from_config(config)` in float32, initialised from `seed` without touching the global RNG,
    generating with the tokenizer's pad and EOS tokens."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_cls.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
