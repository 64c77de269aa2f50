"""The dataset folder's finish reads each part's keys once, whatever the number of parts."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from featx.store import DatasetFolder, dataset_folder, feature_schema, rows_table

PROVENANCE = {"settings_hash": "h", "dim": 4}


def test_finish_reads_each_part_once(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    files = {}
    for i in range(6):
        (images / f"{i}.jpg").write_bytes(b"x" * (i + 1))
        files[f"{i}.jpg"] = images / f"{i}.jpg"
    schema = feature_schema(4, PROVENANCE)
    folder = DatasetFolder(tmp_path / "features")
    with folder:
        todo = folder.begin(PROVENANCE, files)
        for part in range(3):
            paths = todo[2 * part : 2 * part + 2]
            rows = rows_table(schema, paths, ["a", "a"], [1, 1], [1, 1], np.eye(4, dtype=np.float32)[:2])
            folder.add(rows, [], index=part)
        reads = []
        recorded = dataset_folder.recorded

        def counting(source, stats):
            reads.append(source.name)
            return recorded(source, stats)

        monkeypatch.setattr(dataset_folder, "recorded", counting)
        finished = folder.finish()
    assert finished.rows == 6 and finished.changes.added == 6
    assert sorted(reads) == sorted(p.name for p in folder.pieces())  # each part once
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in folder.pieces()) == 6
