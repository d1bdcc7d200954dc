"""Runs several training runs in ONE multi-process launch (process start-up and imports dominate the
cost of a tiny run), for tests/test_distributed.py:

    torchrun --nproc_per_node 2 tests/distributed_worker.py spec.json

spec.json: {"runs": [{"argv": [...train.py arguments...], "probe_decode": "out.json",
"sigterm_rank1_at_step": k}, ...]}. Each run writes its usual output folder; the summaries the runs
return (rank 0's) go to spec.json.summaries.json. With probe_decode, after training the worker counts
the torch.distributed collectives issued inside the decoding loop of one more rollout, with the
trainer's ZeRO-3 generation context and without it, into that JSON file. With sigterm_rank1_at_step,
only rank 1 receives a SIGTERM, during step k.
"""

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

COLLECTIVES = ("all_gather_into_tensor", "all_gather", "_all_gather_base", "all_reduce", "broadcast",
               "reduce_scatter_tensor", "_reduce_scatter_base", "all_gather_object", "broadcast_object_list",
               "barrier", "all_to_all_single")
counting = {"on": False, "n": 0}


def _wrap(fn):
    def wrapped(*args, **kwargs):
        if counting["on"]:
            counting["n"] += 1
        return fn(*args, **kwargs)
    return wrapped


# Before DeepSpeed starts: its comm backend keeps references to these functions.
for _name in COLLECTIVES:
    if hasattr(dist, _name):
        setattr(dist, _name, _wrap(getattr(dist, _name)))


def decode_collectives(trainer, step, gathered: bool) -> int:
    """Collectives issued inside Trainer._generate during one rollout."""
    import contextlib

    inner = trainer.sampler.generate

    def counted(*args, **kwargs):
        counting["on"], counting["n"] = True, 0
        try:
            return inner(*args, **kwargs)
        finally:
            counting["on"] = False

    trainer.sampler.generate = counted
    if not gathered:  # the backend's generation phase (ZeRO-3: parameters gathered once) left out
        trainer.backend.generation = contextlib.nullcontext
    try:
        trainer.sampler.rollout(step)
    finally:
        del trainer.sampler.generate
        trainer.backend.__dict__.pop("generation", None)
    return counting["n"]


def main():
    from rtpo.cli import parse_args
    from rtpo.comm import shutdown
    from rtpo.trainer import make_trainer

    spec = json.load(open(sys.argv[1]))
    summaries, finished = [], False
    try:
        for run in spec["runs"]:
            trainer = make_trainer(parse_args(run["argv"]), log=lambda msg: None)
            at = run.get("sigterm_rank1_at_step")
            if at is not None and trainer.comm.rank == 1:
                step_fn = trainer.train_step

                def train_step(step, step_fn=step_fn, at=at):
                    if step == at:
                        os.kill(os.getpid(), signal.SIGTERM)
                    return step_fn(step)

                trainer.train_step = train_step
            summaries.append(trainer.train())
            if run.get("probe_decode"):
                counts = {"gathered": decode_collectives(trainer, 0, True),
                          "not_gathered": decode_collectives(trainer, 0, False)}
                if trainer.comm.rank == 0:
                    with open(run["probe_decode"], "w") as f:
                        json.dump(counts, f)
        if dist.get_rank() == 0:
            with open(sys.argv[1] + ".summaries.json", "w") as f:
                json.dump(summaries, f)
        finished = True
    finally:
        shutdown(synchronize=finished)


if __name__ == "__main__":
    main()
