"""Where featx keeps what it can rebuild: the per-user cache folder (XDG base directories).

Evaluate's and probe's feature cache and the compiled Winograd kernels live below it. A
module of its own, so that `net` and `store` can both ask without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/featx`, else `~/.cache/featx` (the XDG base directory rule)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec ignores a relative value: it would depend on the working folder.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "featx"
