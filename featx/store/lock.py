"""One writer per output: an exclusive lock (filelock) beside it, and who holds it.

The lock is `.NAME.lock` beside the output NAME (a file or a dataset folder, whichever engine
writes it); `.NAME.lock.json` beside it says which process holds it, for the refusal message.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from featx.errors import BadInput, Locked, option
from featx.store import atomic

log = logging.getLogger("featx")


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def _holder_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock.json")


def holder(target: Path) -> str:
    """Who holds the lock of `target`, in words (from its sidecar)."""
    try:
        h = json.loads(_holder_path(target).read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h["started"]))
        return f"pid {h['pid']} on {h['host']} (since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class OutputLock:
    """Exclusive lock of one output; `wait` queues behind the holder instead of refusing."""

    def __init__(self, target: Path, wait: bool = False):
        self.target, self.wait = target, wait
        self._lock = FileLock(lock_path(target), timeout=-1, thread_local=False)

    def acquire(self) -> None:
        try:
            # filelock reports an unwritable folder as a lock held by someone: ask the OS first.
            os.close(os.open(lock_path(self.target), os.O_RDWR | os.O_CREAT, 0o644))
            try:
                self._lock.acquire(timeout=0)
            except Timeout:
                who = holder(self.target)
                if not self.wait:
                    raise Locked(
                        f"{self.target} is being written by {who}; wait for it to finish, "
                        f"or pass {option('wait')} to start when it has"
                    ) from None
                log.info(f"waiting for {who} to finish writing {self.target}")
                self._lock.acquire()
        except OSError as e:
            raise BadInput(f"cannot write in {self.target.parent} ({e.strerror or e}); choose a writable -o") from None
        try:
            atomic.write_json(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv},
                _holder_path(self.target),
            )
        except OSError as e:  # e.g. a disk already full: said before any work, naming the file
            self._lock.release()
            raise BadInput(
                f"cannot write {_holder_path(self.target)} ({e.strerror or e}); free some space there, "
                "or choose another output"
            ) from None

    def release(self) -> None:
        # The sidecar goes first, while the lock is still held: never delete a successor's.
        _holder_path(self.target).unlink(missing_ok=True)
        self._lock.release()

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
