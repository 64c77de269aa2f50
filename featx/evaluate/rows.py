"""Feature rows for the heads: a matrix in memory or a feature file on disk, read piece by piece,
never copied whole.

A head's fit reads its rows once per pass, one piece at a time (`pieces()`: the pieces' row
numbers and float32 rows), so that a subset of a matrix (a split's training rows, the part held
out to choose C) costs no copy, and a file larger than memory is read from disk for every pass
(out of core) with memory flat in its row count.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from featx.store.read import feature_batches, read_features_into

# Rows per piece: this many bytes of float32 rows (2,048 rows of 4,096 dims).
PIECE_BYTES = 32 << 20


def piece_rows(dim: int) -> int:
    return max(256, PIECE_BYTES // (4 * max(dim, 1)))


class MatrixRows:
    """Rows `index` of an in-memory matrix (all of them when None), read without copying them whole."""

    def __init__(self, X: np.ndarray, index: np.ndarray | None = None):
        self.X = X
        self.index = None if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.X) if self.index is None else len(self.index)

    @property
    def dim(self) -> int:
        return self.X.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def take(self, index) -> MatrixRows:
        index = np.asarray(index, dtype=np.int64)
        return MatrixRows(self.X, index if self.index is None else self.index[index])

    def pieces(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions among these rows, float32 rows) a piece at a time; a slice of X is a view."""
        step = piece_rows(self.dim)
        for start in range(0, len(self), step):
            where = np.arange(start, min(start + step, len(self)))
            if self.index is None:
                piece = self.X[start : start + len(where)]
            else:
                piece = np.take(self.X, self.index[start : start + len(where)], axis=0)
            yield where, np.asarray(piece, dtype=np.float32)

    def matrix(self) -> np.ndarray:
        return self.X if self.index is None else self.X[self.index]


class StoredRows:
    """Rows of a feature file or folder, read from disk for every pass (out of core).

    `positions[i]` is the row number here of the file's i-th row (-1: not one of these rows), so
    rows may be a reordered subset of the file's (sorted by path, labelled ones only, ...).
    """

    def __init__(self, path: str | Path, positions: np.ndarray, dim: int):
        self.path = Path(path)
        self.positions = np.asarray(positions, dtype=np.int64)
        self.n = int((self.positions >= 0).sum())
        self._dim = int(dim)

    def __len__(self) -> int:
        return self.n

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self._dim

    def take(self, index) -> StoredRows:
        """The rows `index` (row numbers here), numbered in that order."""
        index = np.asarray(index, dtype=np.int64)
        renumber = -np.ones(self.n, np.int64)
        renumber[index] = np.arange(len(index))
        kept = self.positions >= 0
        positions = -np.ones_like(self.positions)
        positions[kept] = renumber[self.positions[kept]]
        return StoredRows(self.path, positions, self._dim)

    def pieces(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, float32 rows) in the file's order, a batch of row groups at a time, the
        next one read on a thread while this one is used (reading overlaps computing)."""
        return read_ahead(self._read())

    def _read(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start, block in feature_batches(self.path, piece_rows(self._dim)):
            where = self.positions[start : start + len(block)]
            keep = where >= 0
            if keep.any():
                yield where[keep], block[keep] if not keep.all() else block

    def matrix(self) -> np.ndarray:
        """The rows in memory (float32 [n, D]), filled row group by row group."""
        return read_features_into(self.path, np.empty((self.n, self._dim), np.float32), self.positions)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def read_ahead(items: Iterator) -> Iterator:
    """`items` in order, each made on a thread while the one before is used: at most three
    alive (the one used, the one waiting, the one being made). Stops the thread when the
    consumer stops early; an error in making an item is raised where that item would be."""
    waiting: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                waiting.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def make() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as error:  # raised again in the consumer's thread
            put(_Failed(error))
            return
        put(_DONE)

    thread = threading.Thread(target=make, name="featx-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = waiting.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def is_rows(X) -> bool:
    return isinstance(X, (MatrixRows, StoredRows))


def as_rows(X) -> MatrixRows | StoredRows:
    return X if is_rows(X) else MatrixRows(X)


def take_rows(X, index):
    """Rows `index` of an array (a copy), or of rows (no copy: still a view, or still on disk)."""
    return X.take(index) if is_rows(X) else X[index]
