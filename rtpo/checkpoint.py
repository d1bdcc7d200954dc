"""Atomic checkpoints: written into a temporary folder, fsynced, then renamed into place.

Layout: <run>/checkpoints/step_000050/{model files, tokenizer files, trainer_state.pt}. A folder
named step_* is complete by construction (rename is atomic); a crash mid-save leaves only a
.tmp-* folder, which is ignored and cleaned up by the next save.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import torch

CKPT_DIR = "checkpoints"
_STEP = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.pt"


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run, oldest first: [(step, path)]."""
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP.match(name)
        if m and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def resolve_resume(path: str) -> str:
    """A checkpoint folder itself, or a run folder -> its newest complete checkpoint."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise FileNotFoundError(f"run.resume = {path!r}: no complete checkpoint there "
                                f"(expected {path}/{CKPT_DIR}/step_N/{STATE_FILE})")
    return ckpts[-1][1]


def save_checkpoint(run_dir: str, step: int, write_fn, keep_last: int = 2) -> str:
    """write_fn(tmp_dir) writes everything; the folder becomes visible only when complete."""
    root = os.path.join(run_dir, CKPT_DIR)
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of a crashed save
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = os.path.join(root, f".tmp-step_{step:06d}-{os.getpid()}")
    write_fn(tmp)
    pause = float(os.environ.get("RTPO_TEST_PAUSE_IN_SAVE", "0") or 0)
    if pause:  # test hook: a window in which a kill leaves a half-written checkpoint
        print(f"[rtpo] pausing {pause}s inside checkpoint save ({tmp})", flush=True)
        time.sleep(pause)
    _fsync_tree(tmp)
    if os.path.exists(final):  # re-saving the same step (e.g. a preemption right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_state(path: str, state: dict) -> None:
    torch.save(state, os.path.join(path, STATE_FILE))


def load_state(path: str) -> dict:
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)


def _remove_stale_tmp(dest: str) -> None:
    """Delete tmp folders of `dest` left by killed processes (a model folder can be ~0.5 GB)."""
    parent, base = os.path.split(dest)
    for entry in os.listdir(parent or "."):
        head, sep, pid = entry.rpartition(".tmp-")
        if sep and head == base and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            except OSError:
                pass  # alive under another user: not ours to delete


def write_atomically(dest: str, write) -> str:
    """Run write(tmp_folder), then rename the folder to `dest` in one step: an interrupted write
    leaves no folder at `dest` (only a tmp folder, removed here when the failure is an exception),
    so a present `dest` is always complete. If another process finished `dest` first, its copy wins."""
    parent = os.path.dirname(dest) or "."
    os.makedirs(parent, exist_ok=True)
    _remove_stale_tmp(dest)
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        _fsync_tree(tmp)  # the data reaches the disk before the rename can
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isdir(dest):
                raise
        _fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
