"""Atomic, verified checkpoints: written into a temporary folder with a manifest, fsynced, then renamed into place.

Layout: <run>/checkpoints/step_000050/{model files, tokenizer files, trainer_state.pt, manifest.json}.
A folder named step_* was complete when it was renamed into place (a crash mid-save leaves only a
.tmp-* folder, ignored and cleaned up by the next save); manifest.json, written last, holds every
file's size and SHA-256, so damage done later (a truncated copy, a deleted file) is found before
resuming instead of failing inside torch or transformers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import time
import zipfile

import torch

CKPT_DIR = "checkpoints"
_STEP = re.compile(r"^(?:\.replaced-)?step_(\d+)$")
STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CheckpointError(Exception):
    """A checkpoint cannot be resumed from; the message names the folder or file and what is wrong."""


# --- test hook: the crash-anywhere test kills the process at chosen write moments -------------------
_moments: list = []


def crash_point(moment: str) -> None:
    """With RTPO_TEST_CRASH_AT=N this process SIGKILLs itself at its N-th write moment; with
    RTPO_TEST_CRASH_AT=TEXT:N, at the N-th moment whose name contains TEXT. It names the moment on
    stderr first. Without the variable (every real run) it does nothing."""
    at = os.environ.get("RTPO_TEST_CRASH_AT")
    if not at:
        return
    _moments.append(moment)
    text, _, n = at.rpartition(":")
    if sum(text in m for m in _moments) == int(n):
        os.write(2, f"[rtpo-test] SIGKILL at: {moment}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


# --- durability -----------------------------------------------------------------------------------
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


_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors, tokenizers) report errno
# torch's archive writer reports a failed write without an errno
_WRITE_FAILED = ("file write failed", "unexpected pos", "PytorchStreamWriter failed")


def write_fault(e: BaseException, path: str):
    """An OSError for what a library raised when a write failed (a full disk, a file-size limit), or
    None when `e` is something else. safetensors raises SafetensorError("File too large (os error
    27)"), torch RuntimeError("[enforce fail at inline_container.cc:...] ... file write failed"):
    neither is an OSError, so callers that handle write faults (exit 3, previous checkpoint intact)
    would miss them."""
    if isinstance(e, OSError):
        if not e.filename:
            e.filename = path
        return e
    text = " ".join(str(e).split())
    m = _OS_ERROR.search(text)
    if m:
        code = int(m.group(1))
        return OSError(code, f"{os.strerror(code)} ({type(e).__name__} while writing)", path)
    if isinstance(e, RuntimeError) and any(w in text for w in _WRITE_FAILED):
        code = _likely_errno(path)  # torch names no errno: find which limit the write ran into
        return OSError(code, f"{os.strerror(code)} (torch: {text[:120]})", path)
    return None


def _likely_errno(path: str) -> int:
    """ENOSPC when the file system of `path` is (nearly) full, EFBIG under a file-size limit, else EIO."""
    import resource

    folder = path
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        st = os.statvfs(folder or ".")
        if st.f_bavail * st.f_frsize < (1 << 20):
            return errno.ENOSPC
    except OSError:
        pass
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return errno.EFBIG
    return errno.EIO


@contextlib.contextmanager
def writing(path: str):
    """A library's write failure inside becomes an OSError naming `path` (write_fault)."""
    try:
        yield
    except Exception as e:
        err = write_fault(e, path)
        if err is None or err is e:
            raise
        raise err from e


def replace_file(path: str, write) -> None:
    """write(tmp_path), fsync, then rename over `path`: a reader (or a resumed run) finds the old
    file or the new one, never a torn one. One writer per run folder (the run lock), so the tmp
    name is fixed and a killed writer's leftover is simply overwritten. A write that fails (a full
    disk) removes the tmp file and raises OSError naming `path`; the old file stays."""
    tmp = path + ".tmp"
    try:
        with writing(path):
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    crash_point(f"{os.path.basename(path)}: written, not yet renamed")
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)

    replace_file(path, write)


# --- manifest and verification --------------------------------------------------------------------
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str, step: int) -> None:
    """manifest.json: every file of the folder (relative path -> bytes, sha256)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            p = os.path.join(root, name)
            files[os.path.relpath(p, folder)] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"step": step, "files": files}, f, indent=1, sort_keys=True)


def verify(path: str) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file of checkpoint `path`."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        return _verify_without_manifest(path)
    try:
        with open(mpath, encoding="utf-8") as f:
            files = json.load(f)["files"]
        for rel, want in sorted(files.items()):
            p = os.path.join(path, rel)
            if not os.path.isfile(p):
                raise CheckpointError(f"{p} is missing")
            size = os.path.getsize(p)
            if size != want["bytes"]:
                raise CheckpointError(f"{p} has {size} bytes, its manifest says {want['bytes']} "
                                      "(truncated or replaced)")
            if _sha256(p) != want["sha256"]:
                raise CheckpointError(f"{p} does not match the SHA-256 in its manifest (damaged)")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{mpath} is damaged ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise CheckpointError(f"{e.filename or path} cannot be read ({e.strerror or e})") from None


def _verify_without_manifest(path: str) -> None:
    """Checkpoints written before manifests: the files resume needs exist and the state archive is whole."""
    for name in (STATE_FILE, "config.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{os.path.join(path, name)} is missing")
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES):
        raise CheckpointError(f"{path} has no weights file ({WEIGHT_FILES[0]})")
    state = os.path.join(path, STATE_FILE)
    try:
        with zipfile.ZipFile(state) as z:  # torch.save writes a zip archive: testzip checks every CRC
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{state} is damaged ({e})") from None
    if bad:
        raise CheckpointError(f"{state} is damaged (entry {bad} fails its CRC)")


# --- listing and resume ---------------------------------------------------------------------------
def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Checkpoints of a run, oldest first: [(step, path)]. A step being re-saved whose old copy was
    moved aside (.replaced-step_N) when the process died still counts, under that name."""
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    found = {}
    for name in sorted(os.listdir(root), reverse=True):  # step_N sorts before .replaced-step_N: it wins
        m = _STEP.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.setdefault(int(m.group(1)), os.path.join(root, name))
    return sorted(found.items())


def is_checkpoint(path: str) -> bool:
    """A folder that is (or was meant to be) one checkpoint, as opposed to a run folder."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, MANIFEST))
                                    or os.path.isfile(os.path.join(path, STATE_FILE))
                                    or bool(_STEP.match(os.path.basename(os.path.normpath(path)))))


def resolve_resume(path: str, log=None, check: bool = True) -> str:
    """A checkpoint folder -> itself, verified (damage raises). A run folder -> its newest intact
    checkpoint: damaged newer ones are reported through `log`, one line each, and skipped."""
    if is_checkpoint(path):
        if check:
            try:
                verify(path)
            except CheckpointError as e:
                raise CheckpointError(f"run.resume: checkpoint {path} cannot be resumed from: {e}. Resume from an "
                                      f"older checkpoint (<run>/{CKPT_DIR}/step_N) or the run folder") from None
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise CheckpointError(f"run.resume = {path!r}: no complete checkpoint there "
                              f"(expected {path}/{CKPT_DIR}/step_N/{STATE_FILE})")
    damaged = []
    for _, candidate in reversed(ckpts):
        try:
            if check:
                verify(candidate)
            return candidate
        except CheckpointError as e:
            damaged.append(str(e))
            if log:
                log(f"[rtpo] warning: skipping damaged checkpoint {candidate}: {e}")
    raise CheckpointError(f"run.resume: every checkpoint in {path} is damaged ({'; '.join(damaged)}); "
                          "start over with --run.overwrite true or restore the folder from a backup")


# --- saving ---------------------------------------------------------------------------------------
def _clean_leftovers(root: str) -> None:
    """Remove .tmp-* folders of crashed saves; put back an old copy moved aside by a crashed re-save
    (or drop it if its replacement made it into place)."""
    for name in os.listdir(root):
        p = os.path.join(root, name)
        if name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
        elif name.startswith(".replaced-"):
            final = os.path.join(root, name[len(".replaced-"):])
            if os.path.exists(final):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, final)


def save_checkpoint(run_dir: str, step: int, write_fn, keep_last: int = 2) -> str:
    """write_fn(tmp_dir) writes everything; the folder becomes visible only when complete. A save
    that fails (a full disk) removes its partial folder and leaves every older checkpoint as it was."""
    root = os.path.join(run_dir, CKPT_DIR)
    os.makedirs(root, exist_ok=True)
    _clean_leftovers(root)
    name = f"step_{step:06d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    try:
        with writing(tmp):
            write_fn(tmp)
        pause = float(os.environ.get("RTPO_TEST_PAUSE_IN_SAVE", "0") or 0)
        if pause:  # test hook: a window in which a kill leaves a half-written checkpoint
            print(f"[rtpo] pausing {pause}s inside checkpoint save ({tmp})", flush=True)
            time.sleep(pause)
        crash_point(f"checkpoint {name}: files written, no manifest yet")
        write_manifest(tmp, step)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    crash_point(f"checkpoint {name}: complete, not yet renamed")
    aside = None
    if os.path.exists(final):  # re-saving a step: the old copy is deleted only once the new one is in place
        aside = os.path.join(root, f".replaced-{name}")
        os.rename(final, aside)
        crash_point(f"checkpoint {name}: old copy moved aside")
    os.rename(tmp, final)
    _fsync_dir(root)
    crash_point(f"checkpoint {name}: renamed into place")
    if aside:
        shutil.rmtree(aside, ignore_errors=True)
    for _, old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_checkpoints(run_dir: str) -> None:
    """Delete the checkpoints of an earlier run in run_dir (a fresh run with --run.overwrite). The
    folder is renamed away first, so a crash midway leaves none of them to be resumed by mistake."""
    root, trash = os.path.join(run_dir, CKPT_DIR), os.path.join(run_dir, f".old-{CKPT_DIR}")
    shutil.rmtree(trash, ignore_errors=True)
    if os.path.isdir(root):
        os.rename(root, trash)
        _fsync_dir(run_dir)
        shutil.rmtree(trash, ignore_errors=True)


def save_state(path: str, state: dict) -> None:
    """trainer_state.pt: tensors and plain values only (dicts, lists, tuples, numbers, strings), so that
    `load_state` can read it with torch's weights-only unpickler."""
    torch.save(state, os.path.join(path, STATE_FILE))


def _numpy_array_globals() -> list:
    """What a numpy array pickles as (data only: these rebuild an array, they call nothing else).
    trainer_state.pt files written before rtpo stored RNG state as tensors hold numpy's MT19937 key."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    out = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    out += [type(np.dtype(t)) for t in ("uint32", "int64", "float64")]  # numpy >= 1.25 pickles dtype classes
    return out


def load_state(path: str) -> dict:
    """trainer_state.pt of checkpoint `path`, read with `weights_only=True`: a file that would need any
    other object rebuilt (a crafted pickle that runs code when loaded) is refused, never unpickled.
    Raises CheckpointError naming the file (unsafe, truncated or unreadable)."""
    import pickle

    file = os.path.join(path, STATE_FILE)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = " ".join(str(e).split("Check the documentation")[0].split())[:300]
        raise CheckpointError(f"{file} holds objects that are not tensors or plain values, and loading it could run "
                              f"code; rtpo does not write such files and refuses to unpickle it ({what})") from None
    except OSError as e:
        raise CheckpointError(f"{file} cannot be read ({e.strerror or e})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:  # truncated or damaged archive
        raise CheckpointError(f"{file} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def rng_state() -> dict:
    """Every random generator the run draws from, as tensors and plain values (weights-only loadable)."""
    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    return {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": py_gauss},
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(st: dict) -> None:
    """Restore `rng_state()`'s generators (also the tuple form older checkpoints stored)."""
    import numpy as np

    py, nps = st["python"], st["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"])
    if isinstance(nps, dict):
        nps = (nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"])
    random.setstate(py)
    np.random.set_state(nps)
    torch.set_rng_state(st["torch"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# --- atomic folders (warm-start cache, GGUF conversions) ------------------------------------------
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
    if os.path.isfile(parent):  # makedirs would say "File exists"
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", parent)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_tmp(dest)
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(dest):
            write(tmp)
        _fsync_tree(tmp)  # the data reaches the disk before the rename can
        crash_point(f"folder {os.path.basename(dest)}: written, not yet renamed")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isdir(dest):
                raise
        _fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


DS_DIR = "deepspeed"  # a DeepSpeed run's ZeRO shards inside a checkpoint folder

# What DeepSpeed's own ZeRO-1/2/3 shards rebuild besides tensors and plain values (read off real checkpoints of
# DeepSpeed 0.19): an enum, the loss scaler's attributes and a dataclass of offsets. Data only: none runs code.
DEEPSPEED_GLOBALS = frozenset({"deepspeed.runtime.zero.config.ZeroStageEnum",
                               "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                               "deepspeed.utils.tensor_fragment.fragment_address"})


def check_deepspeed_shards(folder: str) -> None:
    """DeepSpeed reads its shards with torch.load(weights_only=False), so before it does, every .pt file under
    `folder` is scanned (torch.serialization.get_unsafe_globals_in_checkpoint reads a pickle without running
    it): one that would rebuild anything beyond torch's weights-only set and DEEPSPEED_GLOBALS is refused.
    Raises CheckpointError naming the file."""
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            if not name.endswith(".pt"):
                continue
            p = os.path.join(root, name)
            try:
                extra = set(torch.serialization.get_unsafe_globals_in_checkpoint(p)) - DEEPSPEED_GLOBALS
            except Exception as e:  # not a torch archive (truncated, replaced)
                raise CheckpointError(f"{p} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
            if extra:
                raise CheckpointError(f"{p} would rebuild {', '.join(sorted(extra)[:3])} when DeepSpeed loads it, "
                                      "which could run code; DeepSpeed never writes that, and rtpo refuses to load it")


def deepspeed_checkpoint_message(path: str) -> str:
    return (f"run.resume: {path} was written by a DeepSpeed run (its optimizer state is in ZeRO shards under "
            f"{DS_DIR}/); resume with the same --run.deepspeed config and number of processes, or start a new run "
            f"from its weights with --model {path}")
