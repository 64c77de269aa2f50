"""A run while it runs: a progress bar on stderr, and SIGTERM stopping it like Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a job scheduler's stop) ends the run like Ctrl-C: pieces kept, resumable."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def progress_bar(total: int, show: bool) -> Iterator[Callable[[float], None]]:
    """A rich progress bar over `total` images; yields `advance(n)`. Nothing when not `show`."""
    if not show:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [
        TextColumn("extract"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} images"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    ]
    start = time.perf_counter()
    with Progress(*columns, transient=False, console=Console(file=sys.stderr)) as bar:
        task = bar.add_task("extract", total=total, rate="")
        done = 0.0

        def advance(n: float) -> None:
            nonlocal done
            done += n
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:.2f} img/s")

        yield advance
