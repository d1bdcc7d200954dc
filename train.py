#!/usr/bin/env python
"""Train with GRPO/RTPO.

    python train.py                                   # embedded tiny model + synthetic task, CPU, offline
    python train.py --config cfg.yaml --lr 1e-5 --curriculum.schedule linear
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k --data.subset main --data.format gsm8k
    deepspeed train.py --deepspeed ds_configs/zero2.json ...

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
    from rtpo.trainer import Trainer, TrainingError

    try:
        cfg = parse_args(argv)
        trainer = Trainer(cfg)
        summary = trainer.train()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
