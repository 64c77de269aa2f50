"""featx's errors: what a user did wrong (or must do), each kind with its bad value and fix.

The CLI turns every FeatxError into one line on stderr and exit code 2; library users can
catch FeatxError, or the builtin each kind also is (ValueError, FileNotFoundError, ...).
"""

from __future__ import annotations


class FeatxError(Exception):
    """A user-facing error: the message names the bad value and the fix."""

    exit_code = 2


class BadInput(FeatxError, ValueError):
    """An argument, option, file or setting that featx cannot use as given."""


class SettingsMismatch(BadInput):
    """Existing output or cache was made with other descriptor settings."""


class MissingData(FeatxError, FileNotFoundError):
    """A file, folder, dataset or weights file that is not where it was looked for."""


class Locked(FeatxError, RuntimeError):
    """Another featx process holds the output or cache entry."""


class Unreachable(FeatxError, ConnectionError):
    """A cluster or host that featx was told to use does not answer."""


class DeviceFailed(FeatxError, RuntimeError):
    """The device stopped working mid-run (e.g. a CUDA error that leaves its context unusable)."""

    exit_code = 1
