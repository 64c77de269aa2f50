"""A run while it runs: progress on stderr, and SIGTERM stopping it like Ctrl-C.

On a terminal, a rich progress bar; without one (nohup, a SLURM log, CI), plain lines at a
steady interval and at the end: images done of all, rate, time left.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Seconds between plain progress lines when stderr is not a terminal.
LINE_INTERVAL = 30.0


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
def progress_bar(
    total: int, show: bool, *, stream=None, interval: float = LINE_INTERVAL
) -> Iterator[Callable[[float], None]]:
    """Progress over `total` images; yields `advance(n)`. Nothing when not `show`.

    A rich bar on a terminal; else `progress_lines` every `interval` seconds and at the end.
    """
    stream = stream if stream is not None else sys.stderr
    if not show:
        yield lambda n: None
        return
    if not _is_terminal(stream):
        with progress_lines(total, stream, interval) as advance:
            yield advance
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
    with Progress(*columns, transient=False, console=Console(file=stream)) as bar:
        task = bar.add_task("extract", total=total, rate="")
        done = 0.0

        def advance(n: float) -> None:
            nonlocal done
            done += n
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:.2f} img/s")

        yield advance


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


@contextmanager
def progress_lines(total: int, stream, interval: float = LINE_INTERVAL) -> Iterator[Callable[[float], None]]:
    """Plain lines for logs, e.g. `featx: extract 120/1000 images, 0.52 images/s, 28 min left`:
    every `interval` seconds (from a timer, so a long batch still shows the run is alive) and
    once at the end."""
    start = time.perf_counter()
    done = 0.0
    lock = threading.Lock()
    stop = threading.Event()

    def line() -> None:
        with lock:
            seconds = time.perf_counter() - start
            rate = done / seconds if seconds > 0 else 0.0
            left = f", {_duration((total - done) / rate)} left" if rate > 0 and done < total else ""
            stream.write(f"featx: extract {done:.0f}/{total} images, {rate:.2f} images/s{left}\n")
            stream.flush()

    def tick() -> None:
        while not stop.wait(interval):
            line()

    def advance(n: float) -> None:
        nonlocal done
        with lock:
            done += n

    timer = threading.Thread(target=tick, name="featx-progress", daemon=True)
    timer.start()
    try:
        yield advance
    finally:
        stop.set()
        timer.join()
        line()


def _duration(seconds: float) -> str:
    """A time left in words: 45 s, 12 min, 3 h 05 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"
