"""Fixtures shared with the evaluate tests."""

from tests.evaluate.conftest import other_backend  # noqa: F401
