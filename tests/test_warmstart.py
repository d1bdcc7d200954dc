"""The warm-start cache is reused only when the warm-start would be rebuilt identically."""

import pytest

from rtpo import embedded
from rtpo.config import RTPOConfig
from rtpo.data import Example
from rtpo.warmstart import cache_key


def _key(model_seed=0, questions=("Compute 1+2.",), **ws):
    cfg = RTPOConfig()
    for k, v in ws.items():
        setattr(cfg.warmstart, k, v)
    tok = embedded.build_tokenizer()
    model = embedded.build_model(tok, 32, 1, 2, 1, 64, seed=model_seed)
    rows = [Example(q, "", "3", i) for i, q in enumerate(questions)]
    return cache_key(model, tok, cfg.warmstart, cfg.data, cfg.curriculum, rows)


def test_same_inputs_same_key():
    assert _key() == _key()


def test_key_changes_with_initial_weights_rows_and_settings():
    """Different init weights, a different SFT row set (e.g. a larger held-out split excluded from it)
    or different SFT settings must not reuse a cached model."""
    base = _key()
    assert _key(model_seed=1) != base
    assert _key(questions=("Compute 1+2.", "Compute 2+2.")) != base
    assert _key(steps=7) != base
    assert _key(seed=5) != base
    assert _key(reasoning_fraction=0.5) != base and _key(mix_from=0.5) != base and _key(max_operands=2) != base


def test_warmstart_shows_the_trace_then_mostly_answers():
    """Every example shows its trace before mix_from of the steps, then reasoning_fraction of them do;
    the answer-only target is the same response without the trace."""
    from rtpo.config import WarmstartConfig
    from rtpo.prompts import PromptBuilder, response_ids
    from rtpo.warmstart import reasoning_probability

    wc = WarmstartConfig(steps=100, reasoning_fraction=0.2, mix_from=0.6)
    assert [reasoning_probability(s, wc) for s in (0, 59, 60, 99)] == [1.0, 1.0, 0.2, 0.2]
    tok = embedded.build_tokenizer()
    b = PromptBuilder(tok, RTPOConfig().curriculum, 256)
    ex = Example("Compute 3+5+4 mod 10.", "3+5=8\n8+4=2", "2", 0)
    enc = b.encode(ex)
    eos = tok.eos_token_id
    assert tok.decode(response_ids(b, ex, enc, eos)) == "<think>\n3+5=8\n8+4=2\n</think>\n2<|im_end|>"
    assert tok.decode(response_ids(b, ex, enc, eos, with_reasoning=False)) == "<think>\n</think>\n2<|im_end|>"


@pytest.mark.parametrize("num_threads, expected", [(0, 3), (1, 1)])
def test_warmstart_runs_at_the_default_thread_count_and_the_run_at_its_own(tmp_path, monkeypatch, num_threads,
                                                                           expected):
    """Auto threads on CPU, one process: the warm-start trains at torch's default thread count (set to 3
    here so it differs from every other count in play), the RL run afterwards at one thread (a tiny
    model); an explicit run.num_threads holds for both."""
    import torch

    import rtpo.run
    import rtpo.warmstart
    from rtpo.cli import parse_args
    from rtpo.trainer import Trainer
    from conftest import tiny_args

    seen = []
    train_sft = rtpo.warmstart.train_sft

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return train_sft(*a, **k)

    before = torch.get_num_threads()
    monkeypatch.setattr(rtpo.run, "_DEFAULT_THREADS", 3)
    monkeypatch.setattr(rtpo.warmstart, "train_sft", spy)
    try:
        Trainer(parse_args(tiny_args(tmp_path / "run", tmp_path / "cache", "--run.num_threads", num_threads,
                                     "--run.device", "cpu")), log=lambda m: None)
        assert seen == [expected]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_forked_process_builds_its_warmstart_at_the_thread_count_it_inherited(tmp_path, monkeypatch):
    """OpenMP is not fork-safe: a process forked from another (a multiprocessing "fork" worker, the reliability
    tests' forked train.py) never raises its thread count for the warm-start (a larger team hung such runs)."""
    import os

    import rtpo.run
    import rtpo.warmstart
    from rtpo.cli import parse_args
    from rtpo.trainer import Trainer
    from conftest import tiny_args

    class Seen(Exception):
        pass

    def spy(*a, **k):  # record, then stop before any parallel region runs in the child
        import torch

        raise Seen(torch.get_num_threads())

    monkeypatch.setattr(rtpo.run, "_DEFAULT_THREADS", 3)
    monkeypatch.setattr(rtpo.warmstart, "train_sft", spy)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        msg = "no warm-start"
        try:
            Trainer(parse_args(tiny_args(tmp_path / "run", tmp_path / "cache", "--run.num_threads", 0,
                                         "--run.device", "cpu")), log=lambda m: None)
        except Seen as e:
            msg = str(e.args[0])
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            msg = repr(e)
        finally:
            os.write(w, msg.encode())
            os._exit(0)
    os.close(w)
    seen = os.read(r, 4096).decode()
    os.waitpid(pid, 0)
    assert seen == "1"  # set_threads' count for a tiny model, not the default of 3
