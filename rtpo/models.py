"""Model and tokenizer loading: the embedded tiny model, a local folder, or a hub name."""

from __future__ import annotations

import os

import torch

from rtpo import embedded
from rtpo.config import ConfigError, ModelConfig


def prepare_tokenizer(tok):
    """Left padding for batched generation; a pad token (EOS if the model has none)."""
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(path: str, **kw):
    """AutoTokenizer, except for a tokenizer saved as a plain `tokenizers` backend (the embedded
    one): that is loaded verbatim from its tokenizer.json. AutoTokenizer would pick the model
    type's class (Qwen2Tokenizer), which rebuilds its own pre-tokenizer and drops newlines."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cls = json.load(f).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return prepare_tokenizer(PreTrainedTokenizerFast.from_pretrained(path))
    return prepare_tokenizer(AutoTokenizer.from_pretrained(path, **kw))


def load_model_and_tokenizer(mc: ModelConfig, seed: int = 0):
    """(model in float32 on CPU, tokenizer). The trainer moves the model to its device."""
    if mc.name == "embedded":
        tok = embedded.build_tokenizer()
        model = embedded.build_model(tok, mc.hidden_size, mc.num_layers, mc.num_heads, mc.num_kv_heads,
                                     mc.intermediate_size, seed=seed)
        return model, tok
    from transformers import AutoModelForCausalLM

    if mc.name.endswith(".gguf") and not os.path.isfile(mc.name):
        raise ConfigError(f"model.name {mc.name!r}: no such GGUF file")
    kw = {"revision": mc.revision, "trust_remote_code": mc.trust_remote_code}
    try:
        tok = load_tokenizer(mc.name, **kw)
        model = AutoModelForCausalLM.from_pretrained(mc.name, dtype=torch.float32, **kw)
    except OSError as e:
        raise ConfigError(f"model.name {mc.name!r} could not be loaded ({e}). Offline? Use --model embedded "
                          "or a local folder") from None
    return model, tok
