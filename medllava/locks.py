"""One writer per output folder: a lock held for the whole run, dropped by the kernel when its holder
exits, however it exits."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path


class OutputLocked(OSError):
    """Another live process is writing the same output folder; the message names it and its PID."""


LOCK_WAIT_S = 1.0  # how long a refused run waits for the holder to write its PID into the lock file


def lock_path(folder: str | os.PathLike) -> Path:
    """Where the lock of `folder` lives: `.NAME.medllava.lock` beside it, not inside, so a folder
    replaced whole (`atomic_dir`) keeps its lock and the folder holds only the run's outputs."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.medllava.lock"


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Hold the lock of output folder `folder` for the `with` block, so one run writes it at a time.

    A second run into a held folder raises `OutputLocked` at once, naming the folder and the
    holder's PID, host and command. The lock is `fcntl.flock` on an open file, which the kernel
    drops when its holder exits however it exits, kill -9 included: a lock file left by a dead
    process is not a lock, and the next run simply takes it (its contents, the dead holder's PID,
    are overwritten, never reported). The file is removed on a clean exit. Locks are per open file,
    so one process taking the same folder twice is refused too. Yields the lock file's path.
    """
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _take_lock(path, Path(folder))
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield path
    finally:
        # Unlinked before it is unlocked: a run waiting on this file then sees it is no longer the
        # lock file (`_take_lock` compares inodes) and takes the new one.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _take_lock(path: Path, folder: Path) -> int:
    """An open descriptor of `path` holding its exclusive flock, or `OutputLocked`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                raise OutputLocked(_locked_message(fd, folder)) from None
            finally:
                os.close(fd)
        except OSError:  # no locks on this file system (ENOLCK): say so rather than run unguarded
            os.close(fd)
            raise
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # the holder released and removed this file between our open and flock


def _locked_message(fd: int, folder: Path) -> str:
    """The one line for a held folder. The holder writes its PID just after taking the lock, so a
    file still empty, or naming a process that is gone (a killed earlier holder), is read again."""
    holder, deadline = None, time.monotonic() + LOCK_WAIT_S
    while holder is None and time.monotonic() < deadline:
        holder = _live_holder(os.pread(fd, 4096, 0))
        if holder is None:
            time.sleep(0.05)
    who = "another process (its PID is not recorded yet)"
    if holder:
        who = f"PID {holder.get('pid')} on {holder.get('host')}"
        if holder.get("command"):
            who += f" ({holder['command']})"
    return (f"{folder} is in use by {who}: one run writes an output folder at a time; "
            "wait for it to finish, or give another output folder")


def _live_holder(data: bytes) -> dict | None:
    """The holder recorded in a lock file, or None when none is recorded or it is a dead process
    on this host."""
    try:
        holder = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return None
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, run by another user
    return holder
