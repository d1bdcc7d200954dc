#!/usr/bin/env python
"""Train with GRPO/RTPO.

    python train.py                                   # embedded tiny model + synthetic task, CPU, offline
    python train.py --config cfg.yaml --lr 1e-5 --curriculum.schedule linear
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k --data.subset main --data.format gsm8k
    deepspeed --num_gpus 8 train.py --deepspeed ds_configs/zero2.json ...   # DeepSpeed ZeRO (README: GPU and DeepSpeed)
    torchrun --nproc_per_node 8 train.py ...          # plain DDP

Every config key is listed in README.md (config reference); `--help` prints the defaults.
"""

import json
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from rtpo.config import ConfigError, RTPOConfig, parse_args

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print(json.dumps(RTPOConfig().to_dict(), indent=2))
        return 0
    from rtpo.data import DataError
    from rtpo.distributed import is_main_process, make_trainer, shutdown, strip_launcher_args
    from rtpo.trainer import TrainingError

    argv = strip_launcher_args(argv)  # the `deepspeed` launcher's --local_rank=N
    try:
        cfg = parse_args(argv)
        trainer = make_trainer(cfg)  # plain, DeepSpeed or DDP: see rtpo/distributed.py
        summary = trainer.train()
    except (ConfigError, DataError) as e:  # bad input, found during setup: the output folder is untouched
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except TrainingError as e:  # e.g. repeated non-finite updates; the last good state was saved
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 3
    finally:
        shutdown()
    if is_main_process():
        print(json.dumps(summary, indent=2))
    return 0


def _one_line(e: Exception) -> str:
    """The message on one line, so that `error: ...` is the whole report (a library's text may wrap)."""
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
