"""Reliability (issue 5): exact resume, atomic checkpoints, preemption, numeric faults, bad input,
and user reward code that runs only from the config's explicit `module:function`. Round 2 (issue
14, sections 7-10): damaged checkpoints, one run per folder, file-system faults, crash anywhere.

The SIGKILL and SIGTERM tests run `python train.py` in a subprocess, as a user or a scheduler
would. The others call `train.main(argv)` in-process: the same code path (argument parsing, the
trainer, the exception -> exit code mapping) without a 5 s interpreter start per case. The
crash-anywhere test forks this process, whose imports are done, so that each of its many killed
runs starts in a fraction of a second.
"""

import ast
import contextlib
import errno
import io
import json
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import fault_rewards
import train
from conftest import ROOT, tiny_args
from rtpo import checkpoint as ckpt, runlock
from rtpo.checkpoint import CKPT_DIR, MANIFEST, STATE_FILE, list_checkpoints, load_state
from rtpo.config import ConfigError
from rtpo.cli import parse_args
from rtpo.metrics import read_metrics
from rtpo.synthetic import make_dataset
from rtpo.trainer import Trainer

TESTS = os.path.dirname(os.path.abspath(__file__))


def quiet(msg):
    pass


def custom(name: str, weight: float = 1.0) -> list:
    return ["--rewards.custom", json.dumps({f"fault_rewards:{name}": weight})]


# The run that resume tests compare against. The adaptive schedule (target 0: keep drops 0.25 every
# step; a long anneal_steps keeps its linear ceiling out of the way) and a warmed-up cosine LR make
# the curriculum and scheduler state matter: a resume that lost either would log a different
# keep / lr. slow_zero adds nothing to the reward; it only gives the SIGTERM test a window
# (RTPO_TEST_REWARD_SLEEP) to signal the subprocess mid-run.
RESUME_FLAGS = ["--curriculum.schedule", "adaptive", "--curriculum.adaptive_target", "0",
                "--curriculum.adaptive_step", "0.25", "--curriculum.anneal_steps", "100",
                "--optim.lr_schedule", "cosine",
                "--optim.lr_warmup_steps", "1", *custom("slow_zero")]


def ref_args(out, cache, *extra):
    return tiny_args(out, cache, *RESUME_FLAGS, *extra)


def main(argv, capfd):
    """train.py's main() in-process -> (exit code, stdout, stderr)."""
    rc = train.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    """The one `error:` line of stderr; fails on zero or several, on a traceback, or on output after it."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    return errors[0]


def strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def weights(run_dir, step):
    return load_file(os.path.join(run_dir, CKPT_DIR, f"step_{step:06d}", "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_run(ref, run):
    """Same metrics rows (timings aside) and bit-identical final weights."""
    assert strip_times(read_metrics(run / "metrics.jsonl")) == strip_times(read_metrics(ref / "metrics.jsonl"))
    assert same_weights(weights(run, 4), weights(ref, 4))


def snapshot(root) -> dict:
    """Every folder and file under root, with each file's bytes and mtime."""
    out = {}
    for dirpath, _, files in os.walk(root):
        out[os.path.relpath(dirpath, root) + "/"] = None
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (fh.read(), os.stat(p).st_mtime_ns)
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One warm-start cache for the module: the tiny warm-start is trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def faults():
    fault_rewards.configure()
    yield fault_rewards
    fault_rewards.configure()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """An uninterrupted 4-step run (checkpoints at steps 2 and 4)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    Trainer(parse_args(ref_args(out, cache)), log=quiet).train()
    return out


# ------------------------------------------------------------------------------ subprocess helpers
def start_train(argv, tmp_path, name, **env):
    """`python train.py argv` from the repo root, stdout/stderr to files under tmp_path."""
    stdout, stderr = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, ROOT]), TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1", **env)
    with open(stdout, "w") as o, open(stderr, "w") as r:
        proc = subprocess.Popen([sys.executable, "train.py", *map(str, argv)], cwd=ROOT, stdout=o, stderr=r, env=e)
    return proc, stdout, stderr


def wait_for(cond, proc, what, stderr, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(f"train.py exited ({proc.returncode}) before {what}:\n{stderr.read_text()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}:\n{stderr.read_text()[-3000:]}")


def step_rows(path):
    """Completed step rows of a metrics.jsonl being written (a torn last line is skipped)."""
    rows = []
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return [r for r in rows if "reward" in r]


# ------------------------------------------------------------------------------ 1. exact resume
def test_checkpoint_holds_all_state_resume_needs(reference):
    """A checkpoint carries the step, optimizer and LR-scheduler state, the curriculum state, the
    rollout sampler's generator and the Python/NumPy/torch RNG states (the data order is a pure
    function of (seed, step) and needs none)."""
    st = load_state(os.path.join(reference, CKPT_DIR, "step_000002"))
    assert st["step"] == 2
    assert st["optimizer"]["state"], "the optimizer moments are saved"
    assert st["scheduler"]["last_epoch"] == 2
    assert st["curriculum"] == {"adaptive_keep": 0.5, "example_keep": {}}, "the adaptive keep has moved: resume needs it"
    assert isinstance(st["generator"], torch.Tensor) and st["generator"].numel() > 0
    assert {"python", "numpy", "torch"} <= set(st["rng"])


# ------------------------------------------------------------------------------ 2. atomic checkpoints
@pytest.mark.slow
def test_sigkill_during_save_keeps_previous_checkpoint_and_resume_picks_it(tmp_path, cache, reference, capfd):
    """A train.py killed with SIGKILL while it writes a checkpoint (paused inside the save by
    RTPO_TEST_PAUSE_IN_SAVE) leaves the previous checkpoint byte-for-byte intact and loadable and
    only a .tmp-* folder for the new one; `--resume auto` picks the newest complete checkpoint,
    removes the leftover, and the finished run equals an uninterrupted one (metrics and weights)."""
    out = tmp_path / "run"
    first = Trainer(parse_args(ref_args(out, cache, "--run.stop_after_steps", "2")), log=quiet).train()
    step2 = os.path.join(out, CKPT_DIR, "step_000002")
    assert first["checkpoint"] == step2
    before = snapshot(step2)

    proc, stdout, stderr = start_train(ref_args(out, cache, "--resume", "auto"), tmp_path, "killed",
                                       RTPO_TEST_PAUSE_IN_SAVE="300")
    try:
        wait_for(lambda: "pausing" in stdout.read_text(), proc, "the pause inside the step-4 save", stderr)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    names = sorted(os.listdir(out / CKPT_DIR))
    assert len(names) == 2 and names[0].startswith(".tmp-step_000004-") and names[1] == "step_000002", names
    assert snapshot(step2) == before
    assert list_checkpoints(out) == [(2, step2)]
    assert load_state(step2)["step"] == 2 and weights(out, 2)  # loadable

    rc, log, err = main(ref_args(out, cache, "--resume", "auto"), capfd)
    assert rc == 0, err
    assert f"[rtpo] resuming from {step2}" in log
    assert sorted(os.listdir(out / CKPT_DIR)) == ["step_000002", "step_000004"]  # the .tmp-* is gone
    assert_same_run(reference, out)


def test_keep_last_keeps_only_the_newest_checkpoints(tmp_path, cache):
    """checkpoint.keep_last = K keeps the K newest complete checkpoints and deletes older ones."""
    out = tmp_path / "run"
    Trainer(parse_args(tiny_args(out, cache, "--checkpoint.every", "1", "--checkpoint.keep_last", "2",
                                 "--eval.num_examples", "0")), log=quiet).train()
    assert [s for s, _ in list_checkpoints(out)] == [3, 4]
    assert sorted(os.listdir(out / CKPT_DIR)) == ["step_000003", "step_000004"]


# ------------------------------------------------------------------------------ 3. preemption
@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_exits_0_and_resumes_exactly(tmp_path, cache, reference, capfd):
    """SIGTERM to a running train.py: it finishes the current step, saves a checkpoint, prints
    where and how to continue, and exits 0; no row after that step is logged; `--resume` with the
    printed folder gives the same metrics rows and bit-identical weights as an uninterrupted run."""
    out = tmp_path / "run"
    proc, stdout, stderr = start_train(ref_args(out, cache), tmp_path, "preempted", RTPO_TEST_REWARD_SLEEP="0.5")
    try:
        wait_for(lambda: len(step_rows(out / "metrics.jsonl")) >= 1, proc, "the first step", stderr)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = stdout.read_text()
    assert rc == 0, stderr.read_text()[-3000:]
    m = re.search(r"^\[rtpo\] SIGTERM: saved (\S+) at step (\d+); continue with --resume (\S+)$", text, re.M)
    assert m, text
    path, step, resume = m.group(1), int(m.group(2)), m.group(3)
    assert 1 <= step < 4, "stopped before the end of the run"
    assert list_checkpoints(out)[-1] == (step, path) and load_state(path)["step"] == step
    assert json.loads(text[text.index("{\n"):])["stopped"] == "SIGTERM"
    assert [r["step"] for r in step_rows(out / "metrics.jsonl")] == list(range(step))

    rc, log, err = main(ref_args(out, cache, "--resume", resume), capfd)
    assert rc == 0, err
    assert f"[rtpo] resuming from {path}" in log
    assert_same_run(reference, out)


def test_sigint_stops_at_step_boundary_with_checkpoint(tmp_path, cache, capfd, faults):
    """SIGINT (Ctrl-C) during step 1 lets step 1 finish, saves step_000002, prints where, and
    train.py's main returns 0; the signal does not escape the trainer."""
    escaped = []
    previous = signal.signal(signal.SIGINT, lambda *a: escaped.append(a))  # a missed signal lands here
    try:
        faults.configure(signal_at=1)
        out = tmp_path / "run"
        rc, log, err = main(tiny_args(out, cache, *custom("sigint_reward"), "--eval.num_examples", "0"), capfd)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc == 0 and not escaped, err
    path = os.path.join(out, CKPT_DIR, "step_000002")
    assert f"[rtpo] SIGINT: saved {path} at step 2; continue with --resume {out}" in log
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]
    assert list_checkpoints(out) == [(2, path)]


# ------------------------------------------------------------------------------ 4. numeric faults
def test_transient_nan_update_skips_that_update_logs_and_counts_it(tmp_path, cache, capfd, faults):
    """An update whose forward pass computes NaN at step 1 only: step 1's update is skipped (weights
    unchanged across it), a log line says so, metrics count it (skipped_updates = 1, loss null),
    the summary counts it, and training goes on with updates at steps 0 and 2."""
    faults.configure(nan_calls=(1,))
    out = tmp_path / "run"
    rc, log, err = main(tiny_args(out, cache, *custom("nan_update"), "--max_steps", "3", "--eval.num_examples", "0",
                                  "--checkpoint.every", "1", "--checkpoint.keep_last", "0"), capfd)
    assert rc == 0, err
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["skipped_updates"] for r in rows] == [0, 1, 0]
    assert rows[1]["loss"] is None and math.isfinite(rows[1]["reward"])
    assert all(math.isfinite(rows[i]["loss"]) for i in (0, 2))
    assert "[rtpo] step 1: non-finite loss (nan)" in log and "update skipped" in log
    assert json.loads((out / "summary.json").read_text())["skipped_updates"] == 1
    w1, w2, w3 = weights(out, 1), weights(out, 2), weights(out, 3)
    assert same_weights(w1, w2), "the skipped step changed the weights"
    assert not same_weights(w2, w3), "the step after the skip updated the weights"


def test_repeated_nan_stops_with_clear_error_and_last_good_checkpoint(tmp_path, cache, capfd, faults):
    """NaN updates from step 1 on with run.max_consecutive_skips = 2: steps 1 and 2 are skipped,
    then the run stops with exit code 3 and one error line that names the cause, the step, the
    checkpoint and the fix; that checkpoint holds the weights of the last good update (step 0) and
    resumes once the fault is gone."""
    faults.configure(nan_from=1)
    out = tmp_path / "run"
    args = tiny_args(out, cache, *custom("nan_update"), "--max_steps", "6", "--eval.num_examples", "0",
                     "--checkpoint.every", "1", "--checkpoint.keep_last", "0", "--run.max_consecutive_skips", "2")
    rc, log, err = main(args, capfd)
    assert rc == 3
    path = os.path.join(out, CKPT_DIR, "step_000003")
    line = error_line(err)
    assert line == (f"error: 2 consecutive steps had non-finite loss or gradients (step 2); last good state saved at "
                    f"{path}. Check rewards for NaN, lower --optim.lr, or raise --run.max_consecutive_skips")
    rows = read_metrics(out / "metrics.jsonl")
    assert [(r["step"], r["skipped_updates"]) for r in rows] == [(0, 0), (1, 1), (2, 1)]
    assert [s for s, _ in list_checkpoints(out)] == [1, 2, 3]
    assert same_weights(weights(out, 3), weights(out, 1))
    assert load_state(path)["step"] == 3 and load_state(path)["skipped_total"] == 2
    assert not (out / "summary.json").exists()

    faults.configure()  # the fault is fixed: the run continues from the last good state
    rc, log, err = main([*args, "--resume", "auto"], capfd)
    assert rc == 0, err
    assert [r["skipped_updates"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 1, 0, 0, 0]


def test_reward_function_that_raises_stops_with_one_line_naming_it(tmp_path, cache, capfd, faults):
    """A user reward function raising mid-run ends the run with exit 3 and one error line naming the
    function, the step and the exception; the checkpoint written before it stays resumable."""
    faults.configure()
    out = tmp_path / "run"
    args = tiny_args(out, cache, *custom("raising_reward"), "--max_steps", "3", "--eval.num_examples", "0",
                     "--checkpoint.every", "1")
    rc, log, err = main(args, capfd)
    assert rc == 3
    assert error_line(err) == ("error: step 1: reward function 'fault_rewards:raising_reward' raised KeyError: "
                               "'missing_field'. Fix it, then continue from the last checkpoint with --resume auto")
    assert [s for s, _ in list_checkpoints(out)] == [1]
    rc, log, err = main([*args, "--resume", "auto"], capfd)
    assert rc == 0, err


@pytest.mark.parametrize("bad", sorted(fault_rewards.BAD_RETURNS))
def test_reward_function_breaking_its_contract_stops_with_one_line_naming_it(bad, tmp_path, cache, capfd, faults):
    """A reward function must return exactly N finite numbers (or None): a dict, numeric strings, a
    string, the wrong length, NaN, inf, a value float32 cannot hold, nested lists, a generator, and
    sys.exit(0) / KeyboardInterrupt raised inside it each end the run at step 1 with exit 3 and one
    error line naming the function (sys.exit(0) used to end the run with exit 0 and no checkpoint;
    a dict was used silently); the step-1 checkpoint written before it is intact and resumable."""
    faults.configure(bad=bad)
    out = tmp_path / "run"
    args = tiny_args(out, cache, *custom("contract_breaker"), "--max_steps", "3", "--eval.num_examples", "0",
                     "--checkpoint.every", "1")
    rc, log, err = main(args, capfd)
    line = error_line(err)
    assert rc == 3, line
    assert line.startswith("error: step 1: reward function 'fault_rewards:contract_breaker' "), line
    assert "--resume auto" in line
    assert [s for s, _ in list_checkpoints(out)] == [1]
    faults.configure()
    rc, log, err = main([*args, "--resume", "auto"], capfd)
    assert rc == 0, err


def test_reward_none_is_no_reward(tmp_path, cache, capfd, faults):
    """None, for the whole return or for single entries, is the documented "no reward": it adds 0."""
    from rtpo.rewards import score

    faults.configure()
    fns = {"fault_rewards:no_reward": (fault_rewards.no_reward, 2.0)}
    assert score(fns, ["a", "b", "c"], ["1"] * 3) == ([0.0] * 3, {"fault_rewards:no_reward": [0.0] * 3})
    assert score(fns, ["a", "b", "c"], ["1"] * 3)[0] == [2.0, 0.0, 2.0]
    rc, _, err = main(tiny_args(tmp_path / "run", cache, *custom("no_reward"), "--max_steps", "2",
                                "--eval.num_examples", "0"), capfd)
    assert rc == 0, err


# ------------------------------------------------------------------------------ 5. bad input
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad (and one good) dataset and config files, outside the workspace whose bytes are checked."""
    d = tmp_path_factory.mktemp("inputs")
    rows = make_dataset(24, seed=3)
    f = {"good": write_jsonl(d / "good.jsonl", rows)}
    f["renamed"] = write_jsonl(d / "renamed.jsonl", [{"problem": r["question"], "reasoning": r["reasoning"],
                                                     "answer": r["answer"]} for r in rows])
    f["no_answer"] = write_jsonl(d / "no_answer.jsonl", [{"question": r["question"], "reasoning": r["reasoning"]}
                                                         for r in rows])
    f["empty_answer"] = write_jsonl(d / "empty_answer.jsonl", [dict(r, answer="" if i == 3 else r["answer"])
                                                               for i, r in enumerate(rows)])
    f["few"] = write_jsonl(d / "few.jsonl", rows[:3])
    (d / "empty.jsonl").write_bytes(b"")
    f["empty"] = str(d / "empty.jsonl")
    (d / "latin1.jsonl").write_bytes('{"question": "caf\u00e9?", "reasoning": "r", "answer": "1"}\n'.encode("latin-1"))
    f["latin1"] = str(d / "latin1.jsonl")
    # a bad byte past the first MiB (only the first MiB was checked: a traceback, exit 1)
    many = make_dataset(24, seed=3) * 700  # ~1.4 MB of JSON lines
    late = "".join(json.dumps(r) + "\n" for r in many).encode()
    cut = late.index(b"\n", (1 << 20) + 1000) + 1
    n_late = late[:cut].count(b"\n") + 1
    (d / "late_latin1.jsonl").write_bytes(late[:cut] + '{"question": "caf\u00e9?", "reasoning": "r", "answer": "1"}\n'
                                          .encode("latin-1") + late[cut:])
    f["late_latin1"], f["late_line"] = str(d / "late_latin1.jsonl"), n_late
    import csv

    with open(d / "late_latin1.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["question", "reasoning", "answer"])
        w.writeheader()
        w.writerows(many * 3)
    raw = (d / "late_latin1.csv").read_bytes()
    cut = raw.index(b"\n", (1 << 20) + 1000) + 1
    (d / "late_latin1.csv").write_bytes(raw[:cut] + "caf\u00e9?,r,1\n".encode("latin-1") + raw[cut:])
    f["late_latin1_csv"], f["late_csv_line"] = str(d / "late_latin1.csv"), raw[:cut].count(b"\n") + 1
    (d / "torn.jsonl").write_text(json.dumps(rows[0]) + '\n{"question": "Compute 1+1.", "reasoning": \n')
    f["torn"] = str(d / "torn.jsonl")
    (d / "typo.yaml").write_text("optim:\n  lrr: 0.001\n")
    f["typo"] = str(d / "typo.yaml")
    (d / "broken.yaml").write_text("optim:\n  lr: [0.001\n")
    f["broken"] = str(d / "broken.yaml")
    (d / "no_run").mkdir()
    f["no_run"] = str(d / "no_run")
    return f


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder holding an earlier run (metrics, config, summary, a checkpoint) that bad runs target."""
    ws = tmp_path_factory.mktemp("workspace")
    run = ws / "run"
    (run / CKPT_DIR / "step_000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 0, "reward": 0.5}\n{"step": 1, "reward": 0.7}\n')
    (run / "config.json").write_text('{"run": {"max_steps": 2}}\n')
    (run / "summary.json").write_text('{"steps": 2}\n')
    (run / CKPT_DIR / "step_000002" / "trainer_state.pt").write_bytes(b"earlier state")
    (run / CKPT_DIR / "step_000002" / "model.safetensors").write_bytes(b"earlier weights")
    return ws


DATA = ["--warmstart.enabled", "false", "--data.num_eval", "4"]
# (id, extra CLI flags given the input files, substrings the one error line must contain)
BAD_INPUTS = [
    ("dataset_field_missing", lambda f: ["--dataset", f["renamed"], *DATA],
     ["row 0 has no field 'question' (data.question_field)", "problem", "--data.question_field"]),
    ("dataset_field_renamed_in_config", lambda f: ["--dataset", f["good"], "--data.reasoning_field", "cot", *DATA],
     ["row 0 has no field 'cot' (data.reasoning_field)", "--data.reasoning_field"]),
    ("answer_missing", lambda f: ["--dataset", f["no_answer"], *DATA],
     ["row 0 has no field 'answer' (data.answer_field)"]),
    ("answer_empty", lambda f: ["--dataset", f["empty_answer"], *DATA],
     ["row 3 field 'answer' (answer) is empty"]),
    ("dataset_empty", lambda f: ["--dataset", f["empty"], *DATA], ["empty.jsonl", "is empty"]),
    ("dataset_not_utf8", lambda f: ["--dataset", f["latin1"], *DATA], ["latin1.jsonl", "is not UTF-8", "re-encode"]),
    ("dataset_not_utf8_after_first_mib", lambda f: ["--dataset", f["late_latin1"], *DATA],
     ["late_latin1.jsonl", "is not UTF-8", "re-encode"]),
    ("dataset_csv_not_utf8_after_first_mib", lambda f: ["--dataset", f["late_latin1_csv"], *DATA],
     ["late_latin1.csv", "is not UTF-8", "re-encode"]),
    ("dataset_torn_json", lambda f: ["--dataset", f["torn"], *DATA], ["torn.jsonl", "could not be read as json: line 2"]),
    ("dataset_no_such_file", lambda f: ["--dataset", f["no_run"] + "/none.jsonl", *DATA],
     ["data.dataset", "none.jsonl", "no such file"]),
    ("dataset_fewer_rows_than_eval", lambda f: ["--dataset", f["few"], *DATA],
     ["few.jsonl", "has 3 rows", "data.num_eval = 4"]),
    ("warmstart_on_a_file_dataset", lambda f: ["--dataset", f["good"], "--warmstart.enabled", "true",
                                               "--data.num_eval", "4"],
     ["warmstart.enabled", "--warmstart.enabled false"]),
    ("question_over_prompt_budget", lambda f: ["--data.max_prompt_tokens", "8"],
     ["data.max_prompt_tokens = 8", "shortest question takes", "--data.max_prompt_tokens"]),
    ("prompt_budget_over_model_context", lambda f: ["--data.max_prompt_tokens", "2000"],
     ["data.max_prompt_tokens + new tokens = 2000 + 12", "context of 1024 positions"]),
    ("schedule_floor_out_of_range", lambda f: ["--curriculum.floor", "1.5"], ["curriculum.floor = 1.5", "[0, 1]"]),
    ("schedule_milestones_decreasing", lambda f: ["--curriculum.milestones", "[0.6, 0.3, 0.9]"],
     ["curriculum.milestones must be increasing", "0.6, 0.3"]),
    ("schedule_unknown", lambda f: ["--curriculum.schedule", "zigzag"], ["curriculum.schedule = 'zigzag'", "cosine"]),
    ("schedule_negative_anneal", lambda f: ["--curriculum.anneal_steps", "-5"], ["curriculum.anneal_steps = -5"]),
    ("negative_max_new_tokens", lambda f: ["--rollout.max_new_tokens", "-3"],
     ["rollout.max_new_tokens = -3 must be > 0"]),
    ("negative_prompt_budget", lambda f: ["--data.max_prompt_tokens", "-1"], ["data.max_prompt_tokens = -1"]),
    ("group_size_1", lambda f: ["--G", "1"], ["rollout.num_generations = 1", "G >= 2"]),
    ("unknown_loss_type", lambda f: ["--loss.loss_type", "ppo"], ["loss.loss_type = 'ppo'", "dapo"]),
    ("adam_beta_out_of_range", lambda f: ["--optim.beta1", "1.5"], ["optim.beta1 = 1.5"]),
    ("adv_eps_zero", lambda f: ["--loss.adv_eps", "0"], ["loss.adv_eps = 0"]),
    ("max_consecutive_skips_zero", lambda f: ["--run.max_consecutive_skips", "0"], ["run.max_consecutive_skips = 0"]),
    ("keep_last_negative", lambda f: ["--checkpoint.keep_last", "-1"], ["checkpoint.keep_last = -1"]),
    ("reward_module_does_not_import", lambda f: ["--rewards.custom", '{"no_such_module_xyz:score": 1}'],
     ["rewards.custom", "'no_such_module_xyz:score'", "cannot import module 'no_such_module_xyz'"]),
    ("reward_function_missing", lambda f: ["--rewards.custom", '{"fault_rewards:no_such_fn": 1}'],
     ["rewards.custom", "has no function 'no_such_fn'"]),
    ("reward_not_module_function", lambda f: ["--rewards.custom", '{"os.system": 1}'],
     ["rewards.custom key 'os.system'", "'module:function'"]),
    ("config_file_typo_key", lambda f: ["--config", f["typo"]], ["typo.yaml", "unknown config key 'optim.lrr'"]),
    ("config_file_broken_yaml", lambda f: ["--config", f["broken"]], ["broken.yaml", "not valid YAML"]),
    ("config_file_missing", lambda f: ["--config", f["no_run"] + "/none.yaml"], ["--config", "none.yaml", "no such file"]),
    ("cli_typo_key", lambda f: ["--optim.lrr", "1"], ["unknown config key 'optim.lrr'"]),
    ("cli_ill_typed_value", lambda f: ["--lr", "fast"], ["'optim.lr' expects float, got 'fast'"]),
    ("cli_non_finite_value", lambda f: ["--lr", "nan"], ["optim.lr = nan must be a finite number"]),
    ("resume_path_without_checkpoint", lambda f: ["--resume", f["no_run"]],
     ["run.resume", "no_run", "no complete checkpoint"]),
    ("resume_auto_in_a_new_folder", lambda f: ["--resume", "auto", "--output_dir", "NEW"],
     ["run.resume", "no complete checkpoint"]),
    ("output_dir_holds_a_run", lambda f: ["--run.overwrite", "false"], ["already holds a run", "--resume auto"]),
    ("warmstart_max_operands_negative", lambda f: ["--warmstart.max_operands", "-1"],
     ["warmstart.max_operands = -1", ">= 2"]),
    ("modulus_one", lambda f: ["--data.modulus", "1"], ["data.modulus = 1", "plain integers"]),
    ("hint_dropout_above_one", lambda f: ["--curriculum.hint_dropout", "1.5"], ["curriculum.hint_dropout = 1.5", "[0, 1]"]),
    ("hint_loss_negative", lambda f: ["--loss.hint_loss", "-1"], ["loss.hint_loss = -1.0 must be >= 0"]),
]


@pytest.mark.parametrize("case,flags,expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_one_error_line_exit_2_outputs_untouched(case, flags, expected, inputs, workspace, cache, capfd):
    """Each bad input makes train.py exit 2 with exactly one stderr line, `error: ...`, naming the
    field and value (no traceback), and leaves the earlier run in the output folder byte-for-byte
    unchanged (overwrite is on, so only the validation stops it) and creates nothing next to it."""
    argv = [a.replace("NEW", str(workspace / "new")) for a in
            tiny_args(workspace / "run", cache, "--run.overwrite", "true", *flags(inputs))]
    before = snapshot(workspace)
    rc, _, err = main(argv, capfd)
    line = error_line(err)
    assert rc == 2, line
    for s in expected:
        assert s in line, (s, line)
    if case == "dataset_not_utf8_after_first_mib":
        assert f"line {inputs['late_line']} " in line, line
    if case == "dataset_csv_not_utf8_after_first_mib":
        assert f"line {inputs['late_csv_line']} " in line, line
    assert snapshot(workspace) == before


@pytest.mark.slow
def test_bad_input_through_the_real_process(inputs, workspace, cache, tmp_path):
    """As a process: a bad config file and a non-UTF-8 dataset each exit 2 with one `error:` line
    on stderr and no traceback, and leave the earlier run untouched."""
    before = snapshot(workspace)
    procs = [start_train(tiny_args(workspace / "run", cache, "--run.overwrite", "true", *flags), tmp_path, name)
             for name, flags in [("config", ["--config", inputs["typo"]]), ("data", ["--dataset", inputs["latin1"], *DATA])]]
    for (proc, _, stderr), expected in zip(procs, ["unknown config key 'optim.lrr'", "is not UTF-8"]):
        assert proc.wait(timeout=240) == 2
        assert expected in error_line(stderr.read_text())
    assert snapshot(workspace) == before


def test_long_reasoning_is_cut_to_the_prompt_budget_and_counted(tmp_path, cache):
    """Reasoning longer than data.max_prompt_tokens is cut (never overflowing the budget): every
    full-hint prompt fits in the budget and the longest fill it exactly, a warning states how many
    traces were cut, and summary.json records the counts."""
    rows = [{"question": f"Compute {i}+1.", "reasoning": "\n".join(f"{j}+{j}={2 * j}" for j in range(i, i + 30)),
             "answer": str(i + 1)} for i in range(12)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    logs = []
    t = Trainer(parse_args(tiny_args(tmp_path / "run", cache, "--dataset", data, *DATA, "--data.max_prompt_tokens", "96",
                                     "--max_steps", "1", "--eval.num_examples", "2")), log=logs.append)
    full = [len(t.run.tok(r.reasoning, add_special_tokens=False)["input_ids"]) for r in t.run.train_rows]
    assert len(full) == 8 and min(full) > 96, "every trace alone is longer than the budget"
    for injection in ("prefix", "turn"):
        t.run.builder.c.injection = injection
        assert max(len(t.run.builder.build(e, 1.0)[0]) for e in t.run.train_enc) <= 96
    t.run.builder.c.injection = "prefix"
    assert "[rtpo] warning: 8 train reasoning traces cut to fit data.max_prompt_tokens = 96" in logs
    summary = t.train()
    assert summary["truncated_traces"] == {"train": 8, "eval": 4}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["truncated_traces"] == {"train": 8, "eval": 4}


def test_no_held_out_rows_is_not_an_error(tmp_path, cache):
    """data.num_eval = 0 (no held-out rows) trains: an empty eval split is not "no rows fit the budget"."""
    summary = Trainer(parse_args(tiny_args(tmp_path / "run", cache, "--data.num_eval", "0", "--max_steps", "1")),
                      log=quiet).train()
    assert summary["steps"] == 1 and summary["eval_after"] == {}


# ------------------------------------------------------------------------------ 6. user code
def test_no_eval_or_exec_and_rewards_import_only_the_configured_function():
    """No module of the trainer calls eval/exec/compile/__import__, and importlib.import_module is
    called in one place only: rewards.import_function, on the config's `module:function`."""
    imports = []
    for folder in ("rtpo", "kernels"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if not name.endswith(".py"):
                continue
            path = os.path.join(ROOT, folder, name)
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    assert node.func.id not in ("eval", "exec", "compile", "__import__"), (path, node.lineno)
                if isinstance(node, ast.Attribute) and node.attr == "import_module":
                    imports.append(f"{folder}/{name}")
    assert imports == ["rtpo/rewards.py"]


def test_code_in_dataset_rows_is_never_run(tmp_path, cache, capfd):
    """Rows whose question, reasoning and answer are Python code (and a `module:function` string)
    train and evaluate as plain text: the code never runs."""
    marker = tmp_path / "PWNED"
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    rows = [{"question": f"Compute {code} {i}", "reasoning": f"exec({code!r})\nfault_rewards:nan_reward",
             "answer": code} for i in range(10)]
    data = write_jsonl(tmp_path / "code.jsonl", rows)
    rc, _, err = main(tiny_args(tmp_path / "run", cache, "--dataset", data, *DATA, "--max_steps", "1",
                                "--eval.num_examples", "2"), capfd)
    assert rc == 0, err
    assert not marker.exists()


# ------------------------------------------------------------------------------ 7. damaged checkpoints
def damage(path, how: str) -> str:
    """Damage checkpoint folder `path` as a full disk, a bad copy or a stray `rm` would -> the file hit."""
    state, weights_file = os.path.join(path, STATE_FILE), os.path.join(path, "model.safetensors")
    if how in ("state_truncated", "unmanifested_state_truncated"):
        if how.startswith("unmanifested"):  # as written before checkpoints had manifests
            os.remove(os.path.join(path, MANIFEST))
        os.truncate(state, os.path.getsize(state) // 2)
        return state
    if how == "weights_missing":
        os.remove(weights_file)
        return weights_file
    assert how == "weights_altered"  # same size, one byte flipped
    with open(weights_file, "r+b") as f:
        f.seek(os.path.getsize(weights_file) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    return weights_file


@pytest.fixture
def run_copy(reference, tmp_path):
    """A copy of the reference run (checkpoints at steps 2 and 4), to damage."""
    return Path(shutil.copytree(reference, tmp_path / "run"))


@pytest.mark.parametrize("how", ["state_truncated", "weights_missing", "weights_altered",
                                 "unmanifested_state_truncated"])
def test_verify_names_the_damaged_file(how, run_copy):
    """checkpoint.verify passes an intact checkpoint and, for each kind of damage (a truncated
    trainer state, a deleted or altered weights file, a truncated state in a checkpoint without a
    manifest), raises CheckpointError naming the damaged file."""
    step4 = os.path.join(run_copy, CKPT_DIR, "step_000004")
    ckpt.verify(step4)
    bad = damage(step4, how)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(bad)):
        ckpt.verify(step4)


@pytest.mark.parametrize("how", ["state_truncated", "weights_missing"])
def test_resume_auto_skips_a_damaged_newest_checkpoint_in_one_line(how, run_copy, cache, reference, capfd):
    """`--resume auto` verifies the newest checkpoint before using it: a damaged one (trainer state
    cut in half, weights file deleted) is reported in one warning line naming the file, the newest
    intact checkpoint is used instead, and the finished run equals an uninterrupted one."""
    step2, step4 = (os.path.join(run_copy, CKPT_DIR, f"step_00000{s}") for s in (2, 4))
    bad = damage(step4, how)
    rc, log, err = main(ref_args(run_copy, cache, "--resume", "auto"), capfd)
    assert rc == 0, err
    warnings = [ln for ln in log.splitlines() if "damaged" in ln]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"[rtpo] warning: skipping damaged checkpoint {step4}: {bad} "), log
    assert f"[rtpo] resuming from {step2}" in log
    assert_same_run(reference, run_copy)


def test_resaving_a_step_never_leaves_it_missing(tmp_path, monkeypatch):
    """Re-saving a step moves the old copy aside and deletes it only once the new one is in place:
    a crash between the two renames leaves step N listed (its old copy), verified intact and
    resumable, and the next save puts it back in place and removes every leftover."""
    def writer(tag):
        def write(tmp):
            os.makedirs(tmp)
            torch.save({"tag": tag}, os.path.join(tmp, STATE_FILE))
            for name in ("config.json", "model.safetensors"):
                Path(tmp, name).write_text(tag)
        return write

    run = tmp_path / "run"
    first = ckpt.save_checkpoint(run, 2, writer("old"))

    class Crash(BaseException):
        pass

    def crash_at_aside(moment):
        if "old copy moved aside" in moment:
            raise Crash(moment)  # a process dying here runs no cleanup either

    with monkeypatch.context() as m, pytest.raises(Crash):
        m.setattr(ckpt, "crash_point", crash_at_aside)
        ckpt.save_checkpoint(run, 2, writer("new"))
    [(step, path)] = list_checkpoints(run)
    assert step == 2 and os.path.basename(path) == ".replaced-step_000002" and not os.path.exists(first)
    assert ckpt.resolve_resume(str(run)) == path and load_state(path)["tag"] == "old"  # verified intact
    ckpt.save_checkpoint(run, 4, writer("next"))
    assert sorted(os.listdir(run / CKPT_DIR)) == ["step_000002", "step_000004"]
    assert load_state(first)["tag"] == "old"


def test_overwrite_starts_clean_without_the_old_runs_checkpoints(tmp_path, cache, capfd):
    """`--run.overwrite true` over a finished run deletes its checkpoints: afterwards the folder holds
    only the new run's checkpoints and metrics."""
    out = tmp_path / "run"
    flags = ["--eval.num_examples", "0", "--checkpoint.keep_last", "0"]
    assert main(tiny_args(out, cache, *flags, "--checkpoint.every", "1"), capfd)[0] == 0
    assert [s for s, _ in list_checkpoints(out)] == [1, 2, 3, 4]
    rc, _, err = main(tiny_args(out, cache, *flags, "--max_steps", "2", "--run.overwrite", "true"), capfd)
    assert rc == 0, err
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert sorted(os.listdir(out / CKPT_DIR)) == ["step_000002"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]


# ------------------------------------------------------------------------------ 8. one run per folder
def test_run_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    """While a run holds its folder's lock, checking or taking it fails with an error naming the
    holder's PID, host and start time; release() deletes the lock file; a lock file left by a run
    that is gone (its flock is free) is taken over with one warning naming that run."""
    lock = runlock.acquire(str(tmp_path), log=quiet)
    held = f"PID {os.getpid()} on host {socket.gethostname()}, started "
    for attempt in (lambda: runlock.check_output_dir(str(tmp_path)), lambda: runlock.acquire(str(tmp_path))):
        with pytest.raises(ConfigError, match=re.escape(held)):
            attempt()
    lock.release()
    assert not (tmp_path / runlock.LOCK_FILE).exists()
    (tmp_path / runlock.LOCK_FILE).write_text('{"pid": 4242, "host": "gone-host", "started": "yesterday"}')
    logs = []
    lock = runlock.acquire(str(tmp_path), log=logs.append)
    assert logs == [f"[rtpo] warning: taking over the lock of {tmp_path} from a run that is gone "
                    "(PID 4242 on host gone-host, started yesterday)"]
    lock.release()


@pytest.mark.slow
def test_second_run_on_a_busy_folder_exits_2_and_a_killed_runs_lock_is_taken_over(tmp_path, cache, reference, capfd):
    """A second train.py on the output folder of a running one exits 2 with one error line naming
    the holder (PID, host, start time) and leaves the running run's files alone; once the first is
    killed with SIGKILL, `--resume auto` takes its lock over with a warning naming it and the
    finished run equals an uninterrupted one."""
    out = tmp_path / "run"
    proc, stdout, stderr = start_train(ref_args(out, cache), tmp_path, "first", RTPO_TEST_REWARD_SLEEP="0.5")
    try:
        wait_for(lambda: len(step_rows(out / "metrics.jsonl")) >= 1, proc, "the first step", stderr)
        rows = step_rows(out / "metrics.jsonl")
        rc, _, err = main(ref_args(out, cache, "--run.overwrite", "true"), capfd)
        line = error_line(err)
        assert rc == 2 and f"is in use by another run (PID {proc.pid} on host {socket.gethostname()}, started " in line
        assert step_rows(out / "metrics.jsonl")[:len(rows)] == rows  # not removed by the refused overwrite
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    rc, log, err = main(ref_args(out, cache, "--resume", "auto"), capfd)
    assert rc == 0, err
    assert f"taking over the lock of {out} from a run that is gone (PID {proc.pid} on host" in log
    assert not (out / runlock.LOCK_FILE).exists()
    assert_same_run(reference, out)


def test_second_sigint_quits_at_once_without_saving(tmp_path, cache, capfd, faults):
    """Ctrl-C says that a second one quits at once; a second Ctrl-C during the same step quits
    without finishing the step or saving: exit 130, one error line saying so, no new checkpoint,
    the lock released, and the run continues from its last checkpoint with --resume auto."""
    faults.configure(signal_at=2)
    out = tmp_path / "run"
    args = tiny_args(out, cache, *custom("sigint_twice_reward"), "--eval.num_examples", "0", "--checkpoint.every", "1")
    rc, log, err = main(args, capfd)
    assert rc == 130
    assert "[rtpo] SIGINT: stopping after this step with a checkpoint; send SIGINT again to quit at once" in err
    assert error_line(err) == (f"error: SIGINT received twice: quit without saving; the checkpoints in {out} are as "
                               "they were: continue with --resume auto")
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]  # step 2 was not finished, nor saved as step 3
    assert not (out / runlock.LOCK_FILE).exists()
    faults.configure()
    assert main([*args, "--resume", "auto"], capfd)[0] == 0


# ------------------------------------------------------------------------------ 9. file-system faults
@contextlib.contextmanager
def unprivileged():
    """Runs the block as user `nobody` when the tests run as root (who may read and write anything),
    so that permission faults are real; the saved user id stays root's, to switch back."""
    if os.geteuid() != 0:
        yield
        return
    os.setresgid(65534, 65534, 0)
    os.setresuid(65534, 65534, 0)
    try:
        yield
    finally:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)


class NotInstalled:
    """A meta-path finder under which the named top-level packages are not installed."""

    def __init__(self, *names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def without_packages(monkeypatch, *names):
    for n in names:
        monkeypatch.delitem(sys.modules, n, raising=False)
    monkeypatch.setattr(sys, "meta_path", [NotInstalled(*names), *sys.meta_path])


@pytest.fixture
def fault_env(reference, cache, inputs, monkeypatch):
    """A scratch folder every user can enter (pytest's is private to root) holding a copy of the
    reference run whose folder anyone may write."""
    import datasets  # noqa: F401  (imported once as root: as `nobody` its cache folder is out of reach)

    tmp = Path(tempfile.mkdtemp(prefix="rtpo-faults-"))
    os.chmod(tmp, 0o777)
    run = Path(shutil.copytree(reference, tmp / "run"))
    os.chmod(run, 0o777)
    env = SimpleNamespace(tmp=tmp, run=run, cache=cache, inputs=inputs, monkeypatch=monkeypatch, lock=None,
                          step=lambda s: run / CKPT_DIR / f"step_{s:06d}")
    yield env
    if env.lock:
        env.lock.release()
    shutil.rmtree(tmp, ignore_errors=True)


def listing(root) -> dict:
    """Every path under root with its size and mtime (stat only: some files are unreadable on purpose)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*")}


FAULTS = {}  # name -> (setup(env) -> (argv, substrings of the error line), run as an unprivileged user)


def fault(unprivileged=False):
    def register(setup):
        FAULTS[setup.__name__] = (setup, unprivileged)
        return setup
    return register


@fault()
def output_dir_is_a_file(e):
    (e.tmp / "file").write_text("x")
    return tiny_args(e.tmp / "file", e.cache), ["run.output_dir", "file'", "is a file, not a folder", "--output_dir"]


@fault()
def output_dir_inside_a_file(e):
    (e.tmp / "file").write_text("x")
    return tiny_args(e.tmp / "file" / "run", e.cache), ["run.output_dir", "which is a file", "--output_dir"]


@fault(unprivileged=True)
def output_dir_permission_denied(e):
    (e.tmp / "readonly").mkdir(mode=0o555)
    return (tiny_args(e.tmp / "readonly" / "run", e.cache),
            ["run.output_dir", "permission denied", "readonly", "--output_dir"])


@fault()
def output_dir_in_use_by_a_live_run(e):
    e.lock = runlock.acquire(str(e.run), log=quiet)  # as a running train.py holds it; released after the test
    return (tiny_args(e.run, e.cache, "--resume", "auto"),
            ["run.output_dir", "is in use by another run", f"PID {os.getpid()} on host", "started", runlock.LOCK_FILE])


@fault()
def model_folder_without_config_or_tokenizer(e):
    (e.tmp / "model").mkdir()
    shutil.copy(e.step(4) / "model.safetensors", e.tmp / "model")
    return (tiny_args(e.tmp / "out", e.cache, "--model", e.tmp / "model", *DATA),
            ["model.name", "is a folder without config.json, a tokenizer (tokenizer.json", "save_pretrained"])


@fault()
def model_folder_with_truncated_weights(e):
    shutil.copytree(e.step(4), e.tmp / "model")
    os.truncate(e.tmp / "model" / "model.safetensors", 1000)
    return (tiny_args(e.tmp / "out", e.cache, "--model", e.tmp / "model", *DATA),
            ["model.name", "transformers cannot load this folder", "truncated or damaged"])


@fault(unprivileged=True)
def dataset_unreadable(e):
    shutil.copy(e.inputs["good"], e.tmp / "data.jsonl")
    os.chmod(e.tmp / "data.jsonl", 0)
    return (tiny_args(e.tmp / "out", e.cache, "--dataset", e.tmp / "data.jsonl", *DATA),
            ["data.jsonl: Permission denied (EACCES)", "check that path"])


@fault()
def dataset_is_a_folder(e):
    return tiny_args(e.tmp / "out", e.cache, "--dataset", e.tmp, *DATA), ["data.dataset", "unsupported file type"]


@fault(unprivileged=True)
def config_file_unreadable(e):
    (e.tmp / "cfg.json").write_text('{"optim": {"lr": 0.001}}')
    os.chmod(e.tmp / "cfg.json", 0)
    return tiny_args(e.tmp / "out", e.cache, "--config", e.tmp / "cfg.json"), ["cfg.json: Permission denied (EACCES)"]


@fault()
def warmstart_cache_dir_is_a_file(e):
    (e.tmp / "file").write_text("x")
    return tiny_args(e.tmp / "out", e.tmp / "file"), ["file: is a file, not a folder (ENOTDIR)"]


def _resume_damaged(e, how):
    bad = damage(e.step(4), how)
    return (tiny_args(e.run, e.cache, "--resume", e.step(4)),
            ["run.resume", f"checkpoint {e.step(4)} cannot be resumed from", bad, "older checkpoint"])


@fault()
def resume_checkpoint_state_truncated(e):
    return _resume_damaged(e, "state_truncated")


@fault()
def resume_checkpoint_weights_missing(e):
    return _resume_damaged(e, "weights_missing")


@fault()
def resume_checkpoint_weights_altered(e):
    return _resume_damaged(e, "weights_altered")


@fault()
def resume_unmanifested_checkpoint_truncated(e):
    return _resume_damaged(e, "unmanifested_state_truncated")


@fault(unprivileged=True)
def resume_checkpoint_unreadable(e):
    os.chmod(e.step(4) / "model.safetensors", 0o644)  # transformers writes it 0600: only its own file is unreadable
    os.chmod(e.step(4) / STATE_FILE, 0)
    return (tiny_args(e.run, e.cache, "--resume", e.step(4)),
            [f"{e.step(4) / STATE_FILE} cannot be read (Permission denied)"])


@fault()
def resume_auto_every_checkpoint_damaged(e):
    damage(e.step(2), "weights_missing")
    damage(e.step(4), "state_truncated")
    return tiny_args(e.run, e.cache, "--resume", "auto"), ["every checkpoint in", "is damaged", "--run.overwrite true"]


@fault()
def optional_package_yaml_missing(e):
    (e.tmp / "cfg.yaml").write_text("optim:\n  lr: 0.001\n")
    without_packages(e.monkeypatch, "yaml")
    return tiny_args(e.tmp / "out", e.cache, "--config", e.tmp / "cfg.yaml"), ["No module named 'yaml'", "'pyyaml'"]


@fault()
def optional_package_deepspeed_missing(e):
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("DS_ACCELERATOR", "cpu")):
        e.monkeypatch.setenv(k, v)  # what DistributedTrainer would set in os.environ, restored afterwards
    without_packages(e.monkeypatch, "deepspeed")
    return (tiny_args(e.tmp / "out", e.cache, "--deepspeed", os.path.join(ROOT, "ds_configs", "zero2.json")),
            ["DeepSpeed cannot be imported", "pip install deepspeed"])


@pytest.mark.parametrize("name", list(FAULTS))
def test_expected_failure_ends_in_one_error_line_exit_2(name, fault_env, capfd):
    """Each expected failure found before training (a bad path, an unreadable file, a damaged
    checkpoint, an output folder this user cannot write or a live run holds, a missing optional
    package) ends with exactly one stderr line `error: ...` naming the path, file or package (no
    traceback) and exit code 2, and changes nothing on disk."""
    setup, as_nobody = FAULTS[name]
    argv, expected = setup(fault_env)
    before = listing(fault_env.tmp)
    with unprivileged() if as_nobody else contextlib.nullcontext():
        rc, _, err = main(argv, capfd)
    line = error_line(err)
    assert rc == 2, line
    for s in expected:
        assert str(s) in line, (s, line)
    assert listing(fault_env.tmp) == before


# Real write faults, not injected ones: the fault run is a forked child of this process with a real
# RLIMIT_FSIZE (SIGXFSZ ignored, as Python does, so writes past the limit fail with EFBIG), or its run
# folder on a real, small tmpfs (ENOSPC). What the libraries raise there (safetensors SafetensorError,
# torch RuntimeError "[enforce fail at inline_container.cc] ... file write failed", OSError) must end
# as one error line, exit 3, with the previous checkpoint intact and an exact resume.
def first_half(out, cache, *extra):
    """An uninterrupted run's first 2 steps: it stops with the step-2 checkpoint (exit 0)."""
    rc = train.main([str(a) for a in ref_args(out, cache, "--run.stop_after_steps", "2", *extra)])
    assert rc == 0
    return os.path.join(out, CKPT_DIR, "step_000002")


def fsize_limit(where, out, step2):
    """A per-file size limit that the run's first write of `where` exceeds, and no write before it."""
    size = lambda p: os.path.getsize(p)
    weights_b, state_b = size(os.path.join(step2, "model.safetensors")), size(os.path.join(step2, STATE_FILE))
    if where == "checkpoint_weights_safetensors":
        return weights_b - 1000
    if where == "checkpoint_state_torch_save":
        assert weights_b < state_b - 2000
        return (weights_b + state_b) // 2
    return size(out / "config.json") + 1000  # metrics: the rows outgrow config.json (the largest write before)


# metrics.jsonl, not samples.jsonl, grows first; four more reward functions make its rows outgrow config.json
BIG_ROWS = ["--log.sample_groups", "0", "--log.sample_eval_rows", "0", "--rewards.boxed", "0.01", "--rewards.gsm8k",
            "0.01", "--rewards.json_answer", "0.01", "--rewards.length_penalty", "0.01"]


@pytest.mark.parametrize("where", ["checkpoint_weights_safetensors", "checkpoint_state_torch_save", "metrics_append"])
def test_real_file_size_limit_ends_in_one_error_line_exit_3_and_resumes_exactly(where, tmp_path, cache, reference):
    """A run continued from its step-2 checkpoint under a real RLIMIT_FSIZE: the step-4 checkpoint's
    model.safetensors (safetensors raises SafetensorError, not OSError) or trainer_state.pt (torch raises
    RuntimeError from inline_container.cc), or a metrics.jsonl append (EFBIG mid-row), fails: exit 3,
    one error line naming the file and the fix; the step-2 checkpoint is intact and the failed save left
    no partial folder; `--resume auto` without the limit drops the torn row and finishes exactly as an
    uninterrupted run."""
    out = tmp_path / "run"
    extra = BIG_ROWS if where == "metrics_append" else []
    if extra:  # its own uninterrupted run to compare with
        reference = tmp_path / "reference"
        assert train.main([str(a) for a in ref_args(reference, cache, *extra)]) == 0
    step2 = first_half(out, cache, *extra)
    limit = fsize_limit(where, out, step2)
    if extra:
        assert limit < os.path.getsize(reference / "metrics.jsonl") - 500
    rc, _, err = run_forked(ref_args(out, cache, "--resume", "auto", *extra), fsize=limit)
    line = error_line(err)
    assert rc == 3, err
    if where == "metrics_append":
        assert line.startswith(f"error: {out / 'metrics.jsonl'}: File too large (EFBIG); fix that"), line
        assert not (out / "metrics.jsonl").read_text().endswith("\n")  # the torn row is there
    else:
        assert line.startswith("error: saving the checkpoint of step 4 failed: "), line
        assert "File too large" in line and ("SafetensorError" if "weights" in where else "torch: [enforce fail") in line
        assert f"the previous checkpoint {step2} is intact. Free space" in line and "--resume auto" in line
        assert "Traceback" not in err
    assert list_checkpoints(out) == [(2, step2)] and os.listdir(out / CKPT_DIR) == ["step_000002"]
    ckpt.verify(step2)
    rc, _, err = run_forked(ref_args(out, cache, "--resume", "auto", *extra))
    assert rc == 0, err
    assert_same_run(reference, out)


def test_real_file_size_limit_in_the_warmstart_cache_write(tmp_path, cache):
    """The warm-start cache's model.safetensors over a real RLIMIT_FSIZE: exit 3 (a write fault, not bad
    input), one error line naming the cache folder and saying to rerun; no cache folder (or tmp folder) is
    left to be mistaken for a complete one, and the same command without the limit then succeeds."""
    fresh = tmp_path / "cache"
    argv = tiny_args(tmp_path / "run", fresh, "--max_steps", "1", "--eval.num_examples", "0")
    rc, _, err = run_forked(argv, fsize=40_000)
    line = error_line(err)
    assert rc == 3, err
    assert line.startswith(f"error: {fresh}/warmstart-") and "File too large" in line and "run the same command" in line
    assert os.listdir(fresh) == []
    rc, _, err = run_forked(argv)
    assert rc == 0, err
    assert [n for n in os.listdir(fresh) if n.startswith("warmstart-")]


def test_real_file_size_limit_in_the_plot_keeps_the_old_png(tmp_path, reference):
    """curves.png written under a real RLIMIT_FSIZE (in a forked child): matplotlib's write fails and
    plot_metrics raises OSError naming curves.png (the trainer's exit 3 path), the previous curves.png is
    unchanged and no curves.png.tmp is left."""
    import resource

    from rtpo.metrics import plot_metrics

    png = tmp_path / "curves.png"
    assert plot_metrics(str(reference / "metrics.jsonl"), str(png)) == str(png)
    before = png.read_bytes()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 4, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            plot_metrics(str(reference / "metrics.jsonl"), str(png))
            code = 1
        except OSError as e:
            code = 3 if e.errno == errno.EFBIG and str(png) == e.filename else 2
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3
    assert png.read_bytes() == before and os.listdir(tmp_path) == ["curves.png"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real tmpfs of 320 KiB (root only; skipped where mounting is not allowed), unmounted after."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_tmpfs_ends_in_one_error_line_exit_3_and_resumes_exactly(small_tmpfs, cache, reference):
    """The run folder on a real 320 KiB tmpfs: the step-2 checkpoint fits, the step-4 one does not
    (ENOSPC, whichever library is writing): exit 3, one error line, the step-2 checkpoint intact and no
    partial folder; after growing the tmpfs (remount), `--resume auto` finishes exactly as an
    uninterrupted run."""
    out = small_tmpfs / "run"
    step2 = first_half(out, cache)
    rc, _, err = run_forked(ref_args(out, cache, "--resume", "auto"))
    line = error_line(err)
    assert rc == 3, err
    assert "No space left on device" in line and "--resume auto" in line, line
    assert list_checkpoints(out) == [(2, step2)] and os.listdir(out / CKPT_DIR) == ["step_000002"]
    ckpt.verify(step2)
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    rc, _, err = run_forked(ref_args(out, cache, "--resume", "auto"))
    assert rc == 0, err
    assert_same_run(reference, out)


# ------------------------------------------------------------------------------ 10. crash anywhere
def run_forked(argv, crash_at=None, timeout=120, fsize=None):
    """train.py's main(argv) in a forked copy of this process, killed with SIGKILL at write moment
    `crash_at` (RTPO_TEST_CRASH_AT) -> (exit code, or -9 when killed; the moment; its stderr).
    fsize: a real RLIMIT_FSIZE (bytes per file) for the child, SIGXFSZ ignored so writes get EFBIG."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(r)
            os.dup2(w, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.stderr = os.fdopen(2, "w", buffering=1)  # not pytest's capture: the error line goes to the pipe
            sys.stdout = open(os.devnull, "w")
            if crash_at:
                os.environ["RTPO_TEST_CRASH_AT"] = crash_at
            if fsize:
                import resource

                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            code = train.main([str(a) for a in argv])
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    deadline, chunks = time.monotonic() + timeout, []
    while True:
        if not select.select([r], [], [], max(deadline - time.monotonic(), 0))[0]:
            os.kill(pid, signal.SIGKILL)  # hung: the caller sees exit -9 with no moment
            deadline = math.inf
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    err = b"".join(chunks).decode(errors="replace")
    m = re.search(r"^\[rtpo-test\] SIGKILL at: (.+)$", err, re.M)
    return code, m.group(1) if m else None, err


KINDS = {"warm-start cache": "folder warmstart", "checkpoint save": "checkpoint step_",
         "metrics append": "metrics.jsonl", "plot": "curves.png", "summary": "summary.json"}


@pytest.mark.slow
def test_killed_anywhere_resume_auto_finishes_like_an_uninterrupted_run(tmp_path, cache, reference):
    """SIGKILL at >= 20 seeded-random write moments (warm-start cache write, checkpoint save, metrics
    append, plot and summary among them, each at least once), over several runs: after each kill
    metrics.jsonl has only whole rows; rerunning (with `--resume auto` once the folder holds a run)
    always gets further, and every run ends with the metrics and weights of an uninterrupted run
    and no temporary file, moved-aside checkpoint or lock file left behind."""
    seed = 14
    rng = random.Random(seed)
    directed = [f"{KINDS['warm-start cache']}:1", f"{KINDS['checkpoint save']}:{rng.randint(1, 6)}",
                f"{KINDS['metrics append']}:{rng.randint(1, 5)}", f"{KINDS['plot']}:1", f"{KINDS['summary']}:1"]
    kills, cycle = [], 0
    while len(kills) < 20 or directed:
        assert cycle < 12, f"seed {seed}: only {len(kills)} kills in {cycle} runs"
        out, cache_dir = tmp_path / f"run{cycle}", tmp_path / "cache"  # run 0 fills the warm-start cache
        for _ in range(6):  # killed invocations per run; then one that finishes
            spec = directed.pop(0) if directed else str(rng.randint(1, 30))
            argv = ref_args(out, cache_dir, "--log.plot", "true",
                            *(["--resume", "auto"] if (out / "config.json").exists() else []))
            code, moment, err = run_forked(argv, spec)
            if moment is None:  # the run finished before reaching that moment
                assert code == 0, f"seed {seed}, {spec}: exit {code}\n{err[-3000:]}"
                break
            assert code == -signal.SIGKILL, err[-3000:]
            kills.append(moment)
            if (out / "metrics.jsonl").exists():
                text = (out / "metrics.jsonl").read_text()
                assert not text or text.endswith("\n"), f"seed {seed}: torn row after a kill at {moment}"
                read_metrics(out / "metrics.jsonl")  # every row parses
        else:
            code, _, err = run_forked([*ref_args(out, cache_dir, "--log.plot", "true"), "--resume", "auto"])
            assert code == 0, err[-3000:]
        assert_same_run(reference, out)
        left = [p for p in [*out.rglob("*"), *cache_dir.rglob("*")]
                if ".tmp" in p.name or p.name.startswith((".replaced-", ".old-")) or p.name == runlock.LOCK_FILE]
        assert not left, f"seed {seed}: left behind {left}"
        cycle += 1
    for kind, text in KINDS.items():
        assert any(text in m for m in kills), f"no kill during the {kind}: {kills}"
    print(f"{len(kills)} kills over {cycle} runs: {kills}")
