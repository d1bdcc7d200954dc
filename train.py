#!/usr/bin/env python
"""Train with GRPO/RTPO.

    python train.py                                   # embedded tiny model + synthetic task, CPU, offline
    python train.py --config cfg.yaml --lr 1e-5 --curriculum.schedule linear
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k --data.subset main --data.format gsm8k
    deepspeed --num_gpus 8 train.py --deepspeed ds_configs/zero2.json ...   # DeepSpeed ZeRO (README: GPU and DeepSpeed)
    torchrun --nproc_per_node 8 train.py ...          # plain DDP

Every config key is listed in README.md (config reference); `--help` prints the defaults.
"""

import errno
import gc
import json
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from rtpo.config import ConfigError, RTPOConfig
    from rtpo.cli import parse_args

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print(json.dumps(RTPOConfig().to_dict(), indent=2))
        return 0
    from rtpo.data import DataError
    from rtpo.cli import strip_launcher_args
    from rtpo.comm import is_main_process, shutdown
    from rtpo.trainer import TrainingError, make_trainer

    argv = strip_launcher_args(argv)  # the `deepspeed` launcher's --local_rank=N
    trainer, finished = None, False
    try:
        cfg = parse_args(argv)
        trainer = make_trainer(cfg)  # one process, DeepSpeed or DDP: see rtpo/backends/
        summary = trainer.train()
        finished = True
    except (ConfigError, DataError) as e:  # bad input, found during setup: the output folder is untouched
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except TrainingError as e:  # e.g. repeated non-finite updates; the last good state was saved
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 3
    except OSError as e:  # a file-system fault (unreadable file, full disk, read-only folder): 2 in setup, 3 later;
        # a failed write (full disk, file-size limit) is 3 even in setup (the warm-start cache write): not bad input
        full = e.errno in _WRITE_FAULTS
        print(f"error: {_os_error(e, trainer is None)}", file=sys.stderr)
        return 2 if trainer is None and not full else 3
    except ModuleNotFoundError as e:  # an optional package a feature needs
        if not e.name or e.name.split(".")[0] in ("rtpo", "kernels"):
            raise  # our own module: a bug, keep the traceback
        print(f"error: {_one_line(e)}; install the package {_PIP_NAMES.get(e.name, e.name)!r} (pip install -e "
              '".[dev]" has every optional one)', file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C before training started, or a second one during it
        print(f"error: {_one_line(e) or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        # the DDP wrapper (its reducer) holds the process group: free it while the group is alive, or gloo's
        # threads may be destroyed at interpreter exit ("terminate called without an active exception")
        if trainer is not None or _distributed():  # gc takes 0.1-0.2 s: not for a config error in one process
            trainer = None
            gc.collect()
        shutdown(synchronize=finished)
    if is_main_process():
        print(json.dumps(summary, indent=2))
    return 0


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _one_line(e: BaseException) -> str:
    """The message on one line, so that `error: ...` is the whole report (a library's text may wrap)."""
    return " ".join(str(e).split())


_PIP_NAMES = {"yaml": "pyyaml"}  # import name -> pip name, where they differ


_WRITE_FAULTS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO}


def _os_error(e: OSError, setup: bool) -> str:
    """The file and the system's reason, then what to do (errno names the class of fault)."""
    what = f"{e.filename}: {_one_line(e.strerror)}" if e.filename and e.strerror else _one_line(e)
    if setup and e.errno in _WRITE_FAULTS:
        fix = "free space (or raise the file-size limit), then run the same command again"
    else:
        fix = ("check that path and its permissions" if setup
               else "fix that (free space, permissions), then continue with --resume auto")
    return f"{what} ({errno.errorcode.get(e.errno, 'OSError')}); {fix}"


if __name__ == "__main__":
    sys.exit(main())
