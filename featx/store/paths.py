"""Output paths, one rule for every file featx writes: refused before any work when they cannot
be written, missing folders above them made when they are.

Every output option (`extract -o`, `--report`, `--predictions`, `--cache-dir`, `index -o`,
`neighbours -o`/`--sheet`, `--results`) is checked by `check_output` on the arguments alone
(nothing created, nothing heavy imported), so the CLI refuses a bad path at once; the writer
then makes the missing folders with `make_parent`, so a new `out/` folder is created, never refused.
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


def check_output(
    path: str | Path, option: str, *, suffix: str | tuple[str, ...] | None = None, folder: bool = False
) -> Path:
    """`path` (expanded) if featx could write it (missing folders are made when it is written);
    else BadInput in one line. `suffix`: the name's allowed endings ("" allows none at all)."""
    path = Path(path).expanduser()
    allowed = (suffix,) if isinstance(suffix, str) else tuple(suffix or ())
    if allowed and path.suffix.lower() not in allowed:
        named = [s for s in allowed if s]
        example = path.with_suffix(named[0]) if path.suffix else path.with_name(path.name + named[0])
        raise BadInput(
            f"{option} {path} must end in {' or '.join(named)}"
            + (" (or have no suffix)" if "" in allowed else "")
            + f"; e.g. {option} {example}"
        )
    if not folder and path.is_dir():
        example = path / ("out" + next((s for s in allowed if s), ".parquet"))
        raise BadInput(f"{option} {path} is a folder; give a file name such as {example}")
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
