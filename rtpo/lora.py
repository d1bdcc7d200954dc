"""LoRA adapters (PEFT) for the policy: inject, freeze, reference, save, load, merge.

The adapters are injected INTO the transformers model (peft's LoRA layers replace the target linear
layers in place), so the trainer, the rollout engine (rtpo/generation.py) and the fused log-prob pass
(rtpo/logprobs.py: get_decoder(), get_output_embeddings()) keep calling the same model object, class
and signature as in full fine-tuning. The `PeftModel` wrapper is kept beside it only for what peft
owns: saving the adapter, and `disable_adapter()` for the reference policy.

- LoRA B starts at zero, so the adapted model computes exactly what the base model computes until the
  first update, and the base with adapters disabled IS the starting policy: with loss.beta > 0 the
  reference is that (`AdaptersOff`), not a second copy of the weights.
- A checkpoint holds `adapter_config.json` + `adapter_model.safetensors` (loadable with
  `PeftModel.from_pretrained(base, folder)`), the tokenizer and trainer_state.pt. The adapter config
  names its base model: the model's own folder or hub name when the base is that model unchanged,
  else (the embedded model, any warm-started model) `<run>/base_model`, written once per run.
- `load_merged` rebuilds an ordinary transformers model (base + adapter merged) for rtpo.eval and
  rtpo.export.

peft is imported only when LoRA is on (model.lora.r > 0).
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from rtpo.config import ConfigError, LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_DIR = "base_model"  # <run>/base_model: the frozen base of a LoRA run when no other copy is loadable
INSTALL = 'pip install -e ".[lora]"'  # or: pip install peft


def enabled(cfg) -> bool:
    return cfg.model.lora.r > 0


def import_peft(why: str = "model.lora.r > 0"):
    try:
        import peft
    except ImportError:
        raise ConfigError(f"{why}: LoRA needs the peft package; install it with: {INSTALL}") from None
    return peft


def is_adapter(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ADAPTER_CONFIG))


# --- injecting ------------------------------------------------------------------------------------
def linear_names(model) -> list:
    """The distinct leaf names of the model's linear layers (what target_modules may name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def peft_config(lc: LoraConfig, base: str | None = None, revision: str | None = None):
    peft = import_peft()
    return peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                           target_modules=list(lc.target_modules), bias=lc.bias,
                           modules_to_save=list(lc.modules_to_save) or None, task_type="CAUSAL_LM",
                           base_model_name_or_path=base, revision=revision)


def attach(model, lc: LoraConfig, base: str | None, revision: str | None = None, seed: int = 0):
    """Inject LoRA layers into `model` IN PLACE and freeze everything but them; returns the PeftModel
    wrapper (its `.base_model.model` is `model`). lora_A is drawn from a generator seeded by `seed`
    inside a forked RNG, so LoRA leaves the run's global random stream as it was; lora_B is zero."""
    peft = import_peft()
    missing = [t for t in lc.target_modules if not any(n == t or n.endswith("." + t) for n, _ in model.named_modules())]
    if missing:
        raise ConfigError(f"model.lora.target_modules: {', '.join(missing)} not found in {type(model).__name__}; "
                          f"its linear layers are: {', '.join(linear_names(model))}")
    missing = [t for t in lc.modules_to_save if not any(n == t or n.endswith("." + t) for n, _ in model.named_modules())]
    if missing:
        raise ConfigError(f"model.lora.modules_to_save: {', '.join(missing)} not found in {type(model).__name__}")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")  # set right below
        try:
            pm = peft.get_peft_model(model, peft_config(lc, base, revision))
        except ValueError as e:  # e.g. a target that is not a layer type LoRA supports
            raise ConfigError(f"model.lora: peft refused the settings ({' '.join(str(e).split())})") from None
    for p in model.parameters():  # frozen now: a gradient left by the warm-start must not enter any norm
        if not p.requires_grad:
            p.grad = None
    pm.peft_config["default"].base_model_name_or_path = base  # get_peft_model overwrites it with the model's own
    pm.peft_config["default"].revision = revision
    return pm


def param_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (ZeRO-3 partitioned parameters by their full size)."""
    n = [(getattr(p, "ds_numel", None) or p.numel(), p.requires_grad) for p in model.parameters()]
    return sum(k for k, t in n if t), sum(k for k, _ in n)


def describe(lc: LoraConfig, model) -> str:
    trainable, total = param_counts(model)
    what = f"LoRA r={lc.r}, alpha={lc.alpha:g} on {','.join(lc.target_modules)}"
    if lc.modules_to_save:
        what += f" (+ full {','.join(lc.modules_to_save)})"
    return f"{what}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


class AdaptersOff:
    """The reference policy of a LoRA run: the policy's own model with its adapters disabled (the base,
    which is the starting policy since LoRA B starts at zero). Backends call the policy under `off()`
    instead of holding a second model: no copy of the weights, no second DeepSpeed engine."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def off(self):
        return self.peft_model.disable_adapter()


# --- the base model -------------------------------------------------------------------------------
def base_source(name: str, changed: bool) -> str | None:
    """What adapter_config.json can name as the base: the model's folder (absolute) or hub name when
    the run trains on that model unchanged; None when the base exists only in this process (the
    embedded model, or a warm-started one) and must be written to <run>/base_model."""
    from rtpo.models import resolve_model_path

    if changed or name == "embedded":
        return None
    path = resolve_model_path(name)  # a .gguf file or an offline preset: its converted folder
    return os.path.abspath(path) if os.path.isdir(path) else path


def base_name(key: str) -> str:
    """A parameter name of the adapted model -> the base model's: `x.base_layer.w` / `x.original_module.w` -> `x.w`."""
    return ".".join(p for p in key.split(".") if p not in ("base_layer", "original_module"))


def base_state_dict(model) -> dict:
    """The base model's weights from a model with LoRA layers injected: adapter tensors (lora_*, the
    trained copies of modules_to_save) dropped, the rest under the base model's names."""
    out = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if any(p.startswith("lora_") for p in parts) or "modules_to_save" in parts:
            continue
        out[base_name(k)] = v
    return out


def write_base(model, tok, dest: str, before: dict | None = None) -> str:
    """Write the frozen base of `model` (LoRA injected) as an ordinary checkpoint folder at `dest`,
    atomically, replacing what is there (an earlier run's base under --run.overwrite). `before`: base
    tensors that train (biases under model.lora.bias != none) as they were before the first update."""
    import shutil

    from rtpo.checkpoint import write_atomically

    state = {k: v.detach().clone() for k, v in base_state_dict(model).items()}  # clones: no shared storage
    state.update({k: v.clone() for k, v in (before or {}).items()})
    shutil.rmtree(dest, ignore_errors=True)

    def write(tmp):
        model.save_pretrained(tmp, state_dict=state)
        tok.save_pretrained(tmp)

    return write_atomically(dest, write)


def read_adapter_config(folder: str) -> dict:
    try:
        with open(os.path.join(folder, ADAPTER_CONFIG), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder}: cannot read {ADAPTER_CONFIG} ({e})") from None


def resolve_base(folder: str) -> tuple[str, str | None]:
    """(path or hub name, revision) of the base model of adapter `folder`: what its adapter_config.json
    names, or — when that folder is gone (the run folder was moved) — the run's own base_model folder
    next to <run>/checkpoints/step_N."""
    ac = read_adapter_config(folder)
    base, rev = ac.get("base_model_name_or_path"), ac.get("revision")
    run_base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(folder))), BASE_DIR)
    if base and os.path.isdir(base):
        return base, rev
    if os.path.isfile(os.path.join(run_base, "config.json")):
        return run_base, None
    if base and not base.startswith((".", os.sep)) and base.count("/") <= 1:  # a hub name
        return base, rev
    raise ConfigError(f"adapter {folder}: its base model {base!r} cannot be found (and there is no {run_base}); "
                      f"edit base_model_name_or_path in {os.path.join(folder, ADAPTER_CONFIG)} to the base's folder")


def load_base(folder: str):
    """The base model of adapter `folder` (float32, CPU), as an ordinary transformers model (a
    vision-language one for a vision-language base)."""
    from rtpo.models import load_pretrained

    base, rev = resolve_base(folder)
    try:
        return load_pretrained(base, revision=rev)
    except OSError as e:
        raise ConfigError(f"adapter {folder}: its base model {base!r} could not be loaded ({e})") from None


# --- the adapter's weights ------------------------------------------------------------------------
def check_matches(folder: str, lc: LoraConfig) -> None:
    """The adapter in `folder` has the shape model.lora asks for (resume needs the same adapter)."""
    ac = read_adapter_config(folder)
    saved = {"r": ac.get("r"), "alpha": ac.get("lora_alpha"), "target_modules": sorted(ac.get("target_modules") or []),
             "modules_to_save": sorted(ac.get("modules_to_save") or []), "bias": ac.get("bias")}
    want = {"r": lc.r, "alpha": lc.alpha, "target_modules": sorted(lc.target_modules),
            "modules_to_save": sorted(lc.modules_to_save), "bias": lc.bias}
    diff = [f"model.lora.{k} = {want[k]!r} but the checkpoint has {saved[k]!r}" for k in want if saved[k] != want[k]]
    if diff:
        raise ConfigError(f"run.resume: {folder}: {'; '.join(diff)}; resume with the run's own LoRA settings")


def load_adapter_weights(peft_model, folder: str) -> None:
    """Load adapter_model.safetensors of `folder` into the injected adapter, every tensor accounted for."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
    res = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in res.missing_keys if "lora_" in k or "modules_to_save" in k]
    if res.unexpected_keys or missing:
        raise ConfigError(f"run.resume: {folder}/{ADAPTER_WEIGHTS} does not fit this model's adapter (missing "
                          f"{missing[:3]}, unexpected {list(res.unexpected_keys)[:3]})")


def save_adapter(peft_model, folder: str) -> None:
    """adapter_config.json + adapter_model.safetensors into `folder` (PeftModel.from_pretrained loads it)."""
    peft_model.save_pretrained(folder, save_embedding_layers=False)


def load_merged(folder: str):
    """An ordinary transformers model: the adapter of `folder` merged into its base (float32, CPU)."""
    import pickle

    from rtpo.models import unsafe_weights_message

    peft = import_peft(f"{folder} is a PEFT adapter")
    base = load_base(folder)
    try:  # peft reads adapter_model.bin with torch.load(weights_only=True): a refusal is an unsafe file
        model = peft.PeftModel.from_pretrained(base, folder).merge_and_unload()
    except pickle.UnpicklingError:
        raise ConfigError(unsafe_weights_message(folder)) from None
    return model.requires_grad_(True)  # as from_pretrained gives it (peft froze the base)



# --- a run's adapters (rtpo.run.setup) ------------------------------------------------------------
def resume_base(cfg, resume_from: str):
    """(the frozen base a LoRA checkpoint was trained on, (its source, revision)); its adapter is loaded by
    `attach_for_run`. Refuses a full-weights checkpoint with LoRA on, and an adapter with it off."""
    r, has = cfg.model.lora.r, is_adapter(resume_from)
    if not has or not r:
        raise ConfigError(f"run.resume: {resume_from} holds " + (
            f"full weights, not a LoRA adapter, but model.lora.r = {r}; resume with --model.lora.r 0, or start a "
            f"LoRA run from its weights with --model {resume_from}" if not has else
            "a LoRA adapter but model.lora.r = 0; resume with the run's --model.lora settings"))
    check_matches(resume_from, cfg.model.lora)
    source = resolve_base(resume_from)
    return load_base(resume_from), source


def attach_for_run(model, cfg, out: str, resume_from: str | None, resumed_base, changed: bool):
    """Inject LoRA into `model` (frozen base, zero-initialised B); on resume, load the checkpoint's adapter
    -> (PEFT model, base tensors pending or None). Fresh run: the adapter config names the model's own
    folder or hub name if the base is that model unchanged (`changed`: warm-started), else
    <out>/base_model, written at the first checkpoint from the pending tensors (base tensors that train,
    i.e. biases with model.lora.bias != none, as they are before any update)."""
    c = cfg
    if c.model.lora.bias != "none" and c.loss.beta > 0:
        raise ConfigError(f"model.lora.bias = {c.model.lora.bias!r} trains the base model's biases, so the base with "
                          "adapters disabled is no longer the starting policy that loss.beta's KL term needs; use "
                          "--model.lora.bias none, or --loss.beta 0")
    run_base = os.path.abspath(os.path.join(out, BASE_DIR))
    if resume_from:
        base, rev = resumed_base
    else:
        base = base_source(c.model.name, changed=changed)
        rev = c.model.revision if base is not None and not os.path.isdir(base) else None
        base = run_base if base is None else base
    pm = attach(model, c.model.lora, base, rev, seed=c.run.seed)
    pending = None
    if resume_from:
        load_adapter_weights(pm, resume_from)
    elif base == run_base:
        trainable = {base_name(n) for n, p in model.named_parameters() if p.requires_grad}
        pending = {k: v.detach().clone() for k, v in base_state_dict(model).items() if k in trainable}
    return pm, pending
