"""Which solver fits a split's head: liblinear for the paper's sizes, the torch head above them.

Solvers (featx evaluate --solver, featx probe --solver, a pipeline's [head] solver): `exact` is
liblinear, the paper's head (arXiv 1409.1556, Appendix B); `scalable` is
featx.evaluate.linear.LinearHead on every core or the GPU, the features in memory; `streamed` is
the same head with the features read from their file for every pass (out of core); `auto` picks
exact up to EXACT_MAX_ROWS training rows (every protocol of the paper: Caltech-256's 60 per class
are 15,420), scalable above, and streamed when the float32 matrix would take more than
MEMORY_SHARE of the machine's memory. (No heavy import here: the CLI lists the choices.)
"""

from __future__ import annotations

import os

from featx.errors import BadInput

SOLVERS = ("auto", "exact", "scalable", "streamed")
EXACT_MAX_ROWS = 20_000
MEMORY_SHARE = 0.5


def matrix_bytes(rows: int, dim: int) -> int:
    return 4 * rows * dim


def memory_budget() -> int:
    """MEMORY_SHARE of the machine's physical memory, in bytes: the largest matrix kept in memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume 8 GB
        total = 8 << 30
    return int(MEMORY_SHARE * total)


def keep_on_disk(solver: str, rows: int, dim: int) -> bool:
    """Whether features of `rows` x `dim` stay on disk (streamed) for `solver`."""
    check_solver(solver)
    if solver in ("auto", "scalable"):
        return matrix_bytes(rows, dim) > memory_budget()
    return solver == "streamed"


def choose_solver(solver: str, n_train: int, stored: bool) -> str:
    """The solver that fits a split of `n_train` training rows (see the module docstring)."""
    check_solver(solver)
    if solver == "exact":
        return "exact"
    if stored:
        return "streamed"
    if solver == "streamed":
        raise BadInput(
            "--solver streamed reads the features from their file for every pass; these are in memory "
            "already: use --solver scalable"
        )
    if solver == "auto":
        return "exact" if n_train <= EXACT_MAX_ROWS else "scalable"
    return "scalable"


def check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise BadInput(f"unknown --solver {solver!r}; choose one of {', '.join(SOLVERS)}")
