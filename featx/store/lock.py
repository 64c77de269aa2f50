"""One writer per output: an exclusive lock beside it, and who holds it; both gone when it ends.

The lock is `.NAME.lock` beside the output NAME (a file or a dataset folder, whichever engine
writes it), held with flock(2) (filelock on systems without it); `.NAME.lock.json` beside it
says which process holds it, for the refusal message. The holder removes both when it lets
go, so a finished output leaves nothing beside it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from featx.errors import BadInput, Locked, option
from featx.store import atomic

try:
    import fcntl
except ImportError:  # Windows: filelock's msvcrt lock, which removes its file itself
    fcntl = None

log = logging.getLogger("featx")


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def holder_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock.json")


def holder(target: Path) -> str:
    """Who holds the lock of `target`, in words (from its sidecar)."""
    try:
        h = json.loads(holder_path(target).read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h["started"]))
        return f"pid {h['pid']} on {h['host']} (since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class OutputLock:
    """Exclusive lock of one output; `wait` queues behind the holder instead of refusing."""

    def __init__(self, target: Path, wait: bool = False):
        self.target, self.wait = target, wait
        self._fd: int | None = None
        self._filelock = None

    def acquire(self) -> None:
        path = lock_path(self.target)
        try:
            if fcntl is None:
                self._acquire_filelock(path)
            else:
                self._fd = self._acquire_flock(path)
        except OSError as e:
            raise BadInput(f"cannot write in {self.target.parent} ({e.strerror or e}); choose a writable -o") from None
        try:
            atomic.write_json(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv},
                holder_path(self.target),
            )
        except OSError as e:
            self.release()
            raise BadInput(
                f"cannot write {holder_path(self.target)} ({e.strerror or e}); free some space there, "
                "or choose another output"
            ) from None

    def _acquire_flock(self, path: Path) -> int:
        waiting = False
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._refuse_or_wait(waiting)
                    waiting = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
                # The holder before us removes the file it locked as it lets go: a lock on that
                # removed file is no lock at all, so make sure ours is on the file at `path`.
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    current = None
                if current is not None and os.path.samestat(os.fstat(fd), current):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _acquire_filelock(self, path: Path) -> None:
        from filelock import FileLock, Timeout

        # filelock reports an unwritable folder as a lock held by someone: ask the OS first.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
        self._filelock = FileLock(path, timeout=-1, thread_local=False)
        try:
            self._filelock.acquire(timeout=0)
        except Timeout:
            self._refuse_or_wait(False)
            self._filelock.acquire()

    def _refuse_or_wait(self, waiting: bool) -> None:
        who = holder(self.target)
        if not self.wait:
            raise Locked(
                f"{self.target} is being written by {who}; wait for it to finish, "
                f"or pass {option('wait')} to start when it has"
            )
        if not waiting:
            log.info(f"waiting for {who} to finish writing {self.target}")

    def release(self) -> None:
        # The sidecar and the lock file go first, while the lock is still held: never a successor's.
        holder_path(self.target).unlink(missing_ok=True)
        if self._fd is not None:
            lock_path(self.target).unlink(missing_ok=True)
            os.close(self._fd)  # closing the last descriptor lets go of the flock
            self._fd = None
        if self._filelock is not None:
            self._filelock.release()
            self._filelock = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
