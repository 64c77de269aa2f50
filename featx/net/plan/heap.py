"""Giving glibc's free heap pages back to the OS between batches, only once they add up.

glibc serves the 1-32 MB activations of each new image shape from its heap and keeps what they
free resident and fragmented, so resident memory grows with every new shape; trimming after
every batch keeps it flat but makes every freed page fault in again. Measured: benchmarks/README.md
("Heap trimming").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

# Growth of resident memory (over its level after the first batch) that makes HeapTrimmer give
# glibc's free heap pages back to the OS.
TRIM_MARGIN_MB = 256


@cache
def glibc_malloc_trim():
    """glibc's malloc_trim, or None where the C library is not glibc (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def resident_bytes() -> int | None:
    """This process's resident set size (Linux /proc), None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """After a batch, give glibc's free heap pages back to the OS once resident memory has
    grown by more than `margin_mb` over its level after the first batch (glibc only).

    Trimming only past the margin bounds RSS by the margin without the page faults of trimming
    every batch. Nothing process-wide is changed: malloc_trim only returns what is free.
    """

    def __init__(self, margin_mb: int = TRIM_MARGIN_MB):
        self.margin = margin_mb << 20
        self.limit: int | None = None

    def __call__(self) -> None:
        trim = glibc_malloc_trim()
        rss = resident_bytes() if trim is not None else None
        if rss is None:
            return
        if self.limit is None:
            self.limit = rss + self.margin
        elif rss > self.limit:
            trim(0)
            after = resident_bytes() or rss
            # Live memory may have grown for good (larger images, kernel caches): trim again
            # only once the heap has grown by another margin over what stayed.
            self.limit = max(self.limit, after + self.margin)
