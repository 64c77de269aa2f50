"""Feature rows for the heads: a matrix's rows without copies, a feature file's rows read into one
preallocated matrix or streamed a piece at a time, reading ahead on a thread."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from featx import store
from featx.errors import BadInput
from featx.evaluate import rows as rows_module
from featx.evaluate.rows import MatrixRows, StoredRows, read_ahead
from featx.store.read import feature_batches, read_features_into


@pytest.fixture
def folder(tmp_path):
    """A feature folder of two files (small row groups), and its rows in stored order."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8)).astype(np.float32)
    schema = store.feature_schema(8, {"settings_hash": "0" * 16, "dim": 8})
    for i, part in enumerate((slice(0, 130), slice(130, 300))):
        n = part.stop - part.start
        table = store.rows_table(
            schema, [f"a/{j}.jpg" for j in range(part.start, part.stop)], ["a"] * n, [1] * n, [1] * n, X[part]
        )
        pq.write_table(table, tmp_path / f"part-{i}.parquet", row_group_size=16)
    return tmp_path, X


def test_batches_and_the_preallocated_reader_follow_the_stored_order(folder):
    path, X = folder
    starts = [(s, len(b)) for s, b in feature_batches(path, 50)]
    assert starts[0] == (0, 50) and sum(n for _, n in starts) == 300
    np.testing.assert_array_equal(np.vstack([b for _, b in feature_batches(path, 50)]), X)
    np.testing.assert_array_equal(read_features_into(path, np.empty((300, 8), np.float32)), X)
    # Rows placed where `positions` says, the negative ones skipped.
    positions = -np.ones(300, np.int64)
    positions[[5, 200, 17]] = [2, 0, 1]
    np.testing.assert_array_equal(read_features_into(path, np.zeros((3, 8), np.float32), positions), X[[200, 17, 5]])


def test_stored_rows_are_a_renumbered_subset_read_a_piece_at_a_time(folder, monkeypatch):
    monkeypatch.setattr(rows_module, "piece_rows", lambda dim: 40)
    path, X = folder
    order = np.random.default_rng(1).permutation(300)  # row i here is the stored row order[i]
    positions = np.empty(300, np.int64)
    positions[order] = np.arange(300)
    stored = StoredRows(path, positions, 8)
    np.testing.assert_array_equal(stored.matrix(), X[order])
    subset = stored.take([7, 3, 250])
    assert len(subset) == 3 and subset.shape == (3, 8)
    np.testing.assert_array_equal(subset.matrix(), X[order[[7, 3, 250]]])
    seen = np.zeros((300, 8), np.float32)
    for where, piece in stored.pieces():
        assert len(piece) <= 40
        seen[where] = piece
    np.testing.assert_array_equal(seen, X[order])


def test_a_matrixs_rows_are_views_until_read():
    X = np.arange(40, dtype=np.float32).reshape(10, 4)
    rows = MatrixRows(X).take([8, 1, 5]).take([2, 0])
    assert len(rows) == 2 and rows.dim == 4
    np.testing.assert_array_equal(rows.matrix(), X[[5, 8]])
    ((where, piece),) = list(rows.pieces())
    np.testing.assert_array_equal(where, [0, 1])
    np.testing.assert_array_equal(piece, X[[5, 8]])


def test_reading_ahead_keeps_order_stops_with_its_consumer_and_raises_where_it_failed():
    assert list(read_ahead(iter(range(100)))) == list(range(100))
    made = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    ahead = read_ahead(items())
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    ahead.close()  # the consumer stops early: the thread stops, having made at most two more
    assert len(made) <= 5 and not any(t.name == "featx-read-ahead" for t in threading.enumerate())

    def failing():
        yield 1
        raise OSError("disk gone")

    ahead = read_ahead(failing())
    assert next(ahead) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(ahead)


def _write(path, X):
    schema = store.feature_schema(X.shape[1], {"settings_hash": "0" * 16, "dim": X.shape[1]})
    n = len(X)
    table = store.rows_table(schema, [f"a/{j}.jpg" for j in range(n)], ["a"] * n, [1] * n, [1] * n, X)
    pq.write_table(table, path, row_group_size=16)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_row_of_nan_or_infinity_is_refused_as_read_naming_its_image(tmp_path, bad):
    X = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    X[70, 3] = bad
    _write(tmp_path / "f.parquet", X)
    with pytest.raises(BadInput) as e:
        read_features_into(tmp_path / "f.parquet", np.empty((100, 8), np.float32))
    assert "the features of a/70.jpg (row 71) hold NaN or infinity" in str(e.value)
    # The streamed rows meet the same check on their first pass.
    with pytest.raises(BadInput, match="a/70.jpg"):
        list(StoredRows(tmp_path / "f.parquet", np.arange(100), 8).pieces())


def test_huge_finite_rows_whose_sums_overflow_are_kept(tmp_path):
    X = np.full((20, 8), 3e38, np.float32)  # each row's float32 sum overflows to inf; every value is finite
    _write(tmp_path / "f.parquet", X)
    np.testing.assert_array_equal(read_features_into(tmp_path / "f.parquet", np.empty((20, 8), np.float32)), X)
