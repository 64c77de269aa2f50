"""Output paths: refused before any work when they cannot be written; missing folders made.

Every file featx writes (feature files, reports, caches) goes through `make_parent`, so a new
`out/` folder is created rather than refused; `check_output` runs on the arguments alone
(nothing is created, nothing heavy imported), so the CLI can refuse a bad path at once.
"""

from __future__ import annotations

import os
from pathlib import Path

from featx.errors import BadInput


def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path.cwd()


def check_output(path: str | Path, option: str, *, suffix: str | None = None, folder: bool = False) -> Path:
    """`path` (expanded) if featx could write it, making missing folders; else BadInput in one line."""
    path = Path(path).expanduser()
    if suffix and path.suffix.lower() != suffix:
        raise BadInput(f"{option} {path} must end in {suffix}; e.g. {option} {path.with_suffix(suffix)}")
    if not folder and path.is_dir():
        raise BadInput(
            f"{option} {path} is a folder; give a file name such as {path / ('out' + (suffix or '.parquet'))}"
        )
    if folder and path.exists() and not path.is_dir():
        raise BadInput(f"{option} {path} is a file; give a folder")
    base = _nearest_existing(path if folder else path.parent)
    if not base.is_dir():
        raise BadInput(f"{option} {path}: {base} is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise BadInput(f"{option} {path}: cannot write in {base} (permission denied); choose a writable path")
    return path


def make_parent(path: str | Path, option: str = "output") -> Path:
    """Create the missing folders above `path`; a path that cannot have them is one line."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BadInput(f"{option} {path}: a file stands where a folder of it should be; choose another path") from None
    except OSError as e:
        raise BadInput(f"{option} {path}: cannot create {path.parent} ({e.strerror}); choose a writable path") from None
    return path
