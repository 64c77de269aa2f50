"""Fixtures of the evaluate and downstream tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def other_backend():
    """A matplotlib backend featx never picks, set for the test and restored after it: a plot
    that switched the backend (as matplotlib.use("Agg") does) leaves another one behind."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    yield "svg"
    matplotlib.use(before)
