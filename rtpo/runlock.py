"""One run per output folder.

A training run holds an exclusive lock (flock) on <run>/.rtpo.lock, which records its PID, host
and start time. The kernel drops the lock when the process dies, even on SIGKILL, so a lock file
whose lock is free belongs to a run that is gone: it is taken over with a warning. A clean exit
deletes the file. Only the process that writes the run folder takes the lock (rank 0 of a
data-parallel run; the other ranks write nowhere in it).
"""

from __future__ import annotations

import json
import os
import socket
import time

from rtpo.config import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

LOCK_FILE = ".rtpo.lock"


def _describe(info: dict) -> str:
    return (f"PID {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
            if info else "a process that is just starting")


def _read(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def _in_use(run_dir: str, info: dict) -> ConfigError:
    return ConfigError(f"run.output_dir {run_dir!r} is in use by another run ({_describe(info)}; lock file "
                       f"{os.path.join(run_dir, LOCK_FILE)}); wait for it to finish or stop it, or pick another "
                       "--output_dir")


def check_output_dir(run_dir: str) -> None:
    """Refuse, before anything is read or written, an output folder that cannot be used: a file, a
    path through a file, a folder this user cannot write, or one locked by a live run."""
    path = os.path.abspath(run_dir)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == path else f"is inside {probe!r}, which is a file"
        raise ConfigError(f"run.output_dir {run_dir!r} {where}, not a folder; pick a folder with --output_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"run.output_dir {run_dir!r}: permission denied (this user cannot write in {probe}); "
                          "pick a folder you can write to with --output_dir")
    if fcntl is None or probe != path:
        return
    try:
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return  # no lock file (or unreadable: acquire() reports it)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise _in_use(run_dir, _read(fd)) from None
    except OSError:
        pass  # a file system without locks: acquire() warns
    finally:
        os.close(fd)


class RunLock:
    """The held lock of one run folder; release() deletes the lock file and drops the lock."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiting process then finds no file, or its own
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def acquire(run_dir: str, log=print) -> RunLock | None:
    """Lock run_dir for this process (it must exist). A live holder -> ConfigError naming it; a dead
    one's lock is taken over with a warning. None where the file system cannot lock (with a warning)."""
    if fcntl is None:
        return None
    path = os.path.join(run_dir, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd)
            os.close(fd)
            raise _in_use(run_dir, info) from None
        except OSError as e:
            os.close(fd)
            log(f"[rtpo] warning: cannot lock {path} ({e.strerror}): this file system has no file locks; make sure "
                "no other run writes to this folder")
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder deleted the file between our open and lock: take the new one
    old = _read(fd)
    if old:
        log(f"[rtpo] warning: taking over the lock of {run_dir} from a run that is gone ({_describe(old)})")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    return RunLock(path, fd)
