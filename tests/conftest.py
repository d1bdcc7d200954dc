import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_args(out, cache, *extra):
    """CLI arguments of a run small enough for CPU tests (a 1-layer embedded model, 4 steps of 2
    prompts x G = 3, no hint loss); `extra` flags come last and override these."""
    return ["--output_dir", str(out), "--max_steps", "4", "--rollout.prompts_per_step", "2", "--G", "3",
            "--rollout.max_new_tokens", "12", "--eval.num_examples", "4", "--eval.max_new_tokens", "12",
            "--eval.every", "2", "--checkpoint.every", "2", "--warmstart.steps", "4", "--warmstart.cache_dir",
            str(cache), "--model.hidden_size", "32", "--model.num_layers", "1", "--model.num_heads", "2",
            "--model.num_kv_heads", "1", "--model.intermediate_size", "64", "--data.synthetic_size", "50",
            "--warmstart.num_examples", "50", "--log.progress", "false", "--log.plot", "false",
            "--optim.micro_batch_size", "4",
            # one thread for the warm-start too (auto raises it in a one-process run): a warm-start's weights depend
            # on its thread count, and tests compare runs whose warm-starts were built in different processes
            "--run.num_threads", "1",
            # the mechanism tests were written against the curriculum alone; they name the hint loss where they use it
            "--loss.hint_loss", "0", *[str(x) for x in extra]]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    matmuls are fastest single-threaded, and on a busy 2-core machine two OpenMP threads stall each
    other (measured: a SmolLM2 parity test took 247 s with 2 threads under load, 2.5 s with 1)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
