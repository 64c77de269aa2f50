"""`featx info` on a large file reads its metadata and one row group's labels at a time."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from featx.store import feature_info, feature_schema, rows_table

GROUP, GROUPS, DIM = 100, 5, 8


@pytest.fixture
def big_file(tmp_path):
    """A feature file of several row groups, labels "a" and "b" and some without a class."""
    schema = feature_schema(DIM, {"dim": DIM, "settings_hash": "h"})
    path = tmp_path / "f.parquet"
    with pq.ParquetWriter(path, schema) as writer:
        for g in range(GROUPS):
            labels = [["a", "b", None][(g * GROUP + i) % 3] for i in range(GROUP)]
            paths = [f"img_{g}_{i}.jpg" for i in range(GROUP)]
            ones = [1] * GROUP
            features = np.zeros((GROUP, DIM), np.float32)
            writer.write_table(rows_table(schema, paths, labels, ones, ones, features), row_group_size=GROUP)
    return path


def test_info_counts_labels_one_row_group_at_a_time(big_file, monkeypatch):
    reads = []
    read_row_group = pq.ParquetFile.read_row_group

    def counting(self, i, columns=None, **kwargs):
        table = read_row_group(self, i, columns=columns, **kwargs)
        reads.append((columns, table.num_rows))
        return table

    def whole(*args, **kwargs):
        raise AssertionError("info read the file as a whole dataset")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    monkeypatch.setattr(pads, "dataset", whole)
    monkeypatch.setattr(pq, "read_table", whole)
    info = feature_info(big_file)
    assert info.rows == GROUP * GROUPS
    expected = {k: sum(1 for j in range(GROUP * GROUPS) if ["a", "b", None][j % 3] == k) for k in ("a", "b", None)}
    assert info.labels == expected
    assert reads == [(["label"], GROUP)] * GROUPS  # the labels of one group at a time, never the features
