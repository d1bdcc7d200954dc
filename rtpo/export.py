"""Export a checkpoint as an ordinary transformers model folder.

    python -m rtpo.export CHECKPOINT OUT

CHECKPOINT: a LoRA run's checkpoint `<run>/checkpoints/step_N` (or its run folder: the newest
checkpoint), or any PEFT adapter folder; the adapter is merged into its base model (the folder or
hub name its adapter_config.json names, else `<run>/base_model`). A full fine-tuning checkpoint is
copied as its weights and tokenizer (without the trainer state). OUT then loads with
`AutoModelForCausalLM.from_pretrained(OUT)`, trains further with `--model OUT` and evaluates with
`python -m rtpo.eval OUT`. Exit codes: 0 done, 2 bad checkpoint or OUT.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from rtpo import checkpoint as ckpt, lora
from rtpo.config import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # a vision-language model's image processor


def resolve(target: str) -> str:
    """The checkpoint folder to export: `target` itself, or a run folder's newest intact checkpoint."""
    if not os.path.isdir(target):
        raise ConfigError(f"checkpoint {target!r}: no such folder")
    if lora.is_adapter(target) or os.path.isfile(os.path.join(target, ckpt.STATE_FILE)):
        return target
    try:
        return ckpt.resolve_resume(target)
    except ckpt.CheckpointError as e:
        raise ConfigError(f"checkpoint {target!r}: {e}") from None


def export(target: str, out: str, log=print) -> str:
    """Write CHECKPOINT's model (its adapter merged into the base) and tokenizer to `out`, atomically."""
    from rtpo.models import load_pretrained, load_tokenizer

    path = resolve(target)
    if os.path.exists(out) and os.listdir(out):
        raise ConfigError(f"OUT {out!r} exists and is not empty; pick a new folder")
    if lora.is_adapter(path):
        model = lora.load_merged(path)
        has_tok = any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES)
        tok = load_tokenizer(path if has_tok else lora.resolve_base(path)[0])
        what = f"adapter {path} merged into {lora.resolve_base(path)[0]}"
    else:
        model = load_pretrained(path)
        tok, what = load_tokenizer(path), f"full weights of {path}"
    if os.path.isdir(out):
        os.rmdir(out)  # empty: write_atomically renames a complete folder into its place

    def write(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for name in PROCESSOR_FILES:  # a vision-language checkpoint's image processor travels with it
            if os.path.isfile(os.path.join(path, name)):
                shutil.copy2(os.path.join(path, name), os.path.join(tmp, name))

    ckpt.write_atomically(out, write)
    log(f"[rtpo.export] {what} -> {out}")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m rtpo.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="LoRA checkpoint, run folder or PEFT adapter folder (or a full checkpoint)")
    ap.add_argument("out", help="the folder to write (must not exist, or be empty)")
    args = ap.parse_args(argv)
    try:
        export(args.checkpoint, args.out, log=lambda m: print(m, file=sys.stderr, flush=True))
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
