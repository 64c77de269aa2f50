"""featx's errors: what a user did wrong (or must do), each kind with its bad value and fix.

The CLI turns every FeatxError into one line on stderr and exit code 2; library users can
catch FeatxError, or the builtin each kind also is (ValueError, FileNotFoundError, ...).
Anything else is a bug: the CLI shows its traceback and asks for a report.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path


class FeatxError(Exception):
    """A user-facing error: the message names the bad value and the fix."""

    exit_code = 2


class BadInput(FeatxError, ValueError):
    """An argument, option, file or setting that featx cannot use as given."""


class SettingsMismatch(BadInput):
    """Existing output or cache was made with other descriptor settings."""


class Damaged(BadInput):
    """A file featx wrote (a feature file, a piece, a state or index file) that cannot be read back.

    `path` is the file; a caller that knows a better fix for it (e.g. the feature cache: remove
    the entry) can say so instead of the generic advice.
    """

    def __init__(self, message: str, path: str | Path):
        super().__init__(message)
        self.path = Path(path)


class MissingData(FeatxError, FileNotFoundError):
    """A file, folder, dataset or weights file that is not where it was looked for."""


class Locked(FeatxError, RuntimeError):
    """Another featx process holds the output or cache entry."""


class Unreachable(FeatxError, ConnectionError):
    """A cluster or host that featx was told to use does not answer."""


class DeviceFailed(FeatxError, RuntimeError):
    """The device stopped working mid-run (e.g. a CUDA error that leaves its context unusable)."""

    exit_code = 1


# Messages name a setting as the caller gave it: `--overwrite` on the command line,
# `overwrite=True` in Python. The CLI sets this around each command (featx.cli.common).
_CLI_WORDS: ContextVar[bool] = ContextVar("featx_cli_words", default=False)


def option(name: str, value: str | None = None) -> str:
    """How a message names setting `name` (CLI spelling, e.g. "overwrite", "cache-dir") set to
    `value` (a placeholder such as "DIR"; None for a flag): "--cache-dir DIR" for the CLI,
    "cache_dir=DIR" (a flag: "overwrite=True") for Python callers."""
    if _CLI_WORDS.get():
        return f"--{name}" + (f" {value}" if value is not None else "")
    return f"{name.replace('-', '_')}={value if value is not None else 'True'}"


def words(cli: str, python: str) -> str:
    """A fix as the caller can apply it: `cli` (a command) on the command line, else `python`."""
    return cli if _CLI_WORDS.get() else python


@contextmanager
def cli_words():
    """Within: messages name settings as command-line options (see `option`)."""
    token = _CLI_WORDS.set(True)
    try:
        yield
    finally:
        _CLI_WORDS.reset(token)
