"""featx output is read as is by pyarrow, pandas, DuckDB and Polars, and by featx's readers.

`feature` is a fixed_size_list<float32>[D]: every tool gets a vector per row, and a
[n, D] matrix from it without a Python list per value.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import featx
from featx import store
from tests.conftest import write_images

# The cheap net: pool5 (512-D) needs a smaller side of only 32 pixels.
SETTINGS = dict(model="vgg11", weights="random", layer="pool5", scales=(32,), precision="fp32")
DIM = 512


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    """A folder of two feature files (classes a, b | c) and the errors file of one broken image."""
    root = tmp_path_factory.mktemp("readers")
    write_images(root / "one", [(40, 30), (30, 40)], seed=1, label="a")
    write_images(root / "one", [(40, 30)], seed=2, label="b")
    (root / "one" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    write_images(root / "two", [(50, 30), (30, 30)], seed=3, label="c")
    out = root / "feats"
    out.mkdir()
    featx.extract_features(root / "one", out / "one.parquet", **SETTINGS)
    featx.extract_features(root / "two", out / "two.parquet", **SETTINGS)
    assert (out / "one.errors.parquet").exists()
    return out


@pytest.fixture(scope="module")
def one(feats):
    return feats / "one.parquet"


def test_pyarrow_reads_fixed_size_lists_and_provenance(one):
    table = pq.read_table(one)
    assert table.schema.field("feature").type == pa.list_(pa.float32(), DIM)
    assert table.column_names == ["path", "label", "width", "height", "feature", "file_size", "file_mtime_ns"]
    assert featx.read_provenance(one)["settings"]["layer"] == "pool5"
    flat = table.column("feature").combine_chunks().flatten().to_numpy()
    X, _ = featx.load_xy(one)
    np.testing.assert_array_equal(flat.reshape(-1, DIM), X)


def test_pandas_reads_one_array_per_row(one):
    df = pd.read_parquet(one)
    assert df["path"].tolist() == ["a/img_000.jpg", "a/img_001.jpg", "b/img_000.jpg"]
    X = np.stack(df["feature"])
    assert X.dtype == np.float32 and X.shape == (3, DIM)
    np.testing.assert_array_equal(X, featx.load_xy(one)[0])


def test_read_features_file_folder_columns_filters(feats, one):
    df = featx.read_features(one)
    assert list(df.columns) == ["path", "label", "width", "height", "feature", "file_size", "file_mtime_ns"]
    assert df["feature"][0].dtype == np.float32 and df["feature"][0].shape == (DIM,)
    # A folder: every feature file in it, never the errors files beside them.
    both = featx.read_features(feats)
    assert both["path"].tolist() == [*df["path"].tolist(), "c/img_000.jpg", "c/img_001.jpg"]
    assert featx.read_features(feats, columns=["path"]).columns.tolist() == ["path"]
    # Filters as DNF tuples or as a pyarrow expression, on columns that need not be read.
    only_a = featx.read_features(feats, columns=["path"], filters=[("label", "=", "a")])
    assert only_a["path"].tolist() == ["a/img_000.jpg", "a/img_001.jpg"]
    wide = featx.read_features(feats, filters=pads.field("width") > 35)
    assert sorted(wide["path"]) == ["a/img_000.jpg", "b/img_000.jpg", "c/img_000.jpg"]
    assert pq.read_table(feats / "one.errors.parquet").column("path").to_pylist() == ["b/broken.jpg"]


def test_load_xy(feats):
    X, y = featx.load_xy(feats)
    assert X.dtype == np.float32 and X.shape == (5, DIM) and X.flags.c_contiguous
    assert y.tolist() == ["a", "a", "b", "c", "c"]
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    Xc, yc = featx.load_xy(feats, filters=[("label", "in", ["c"])])
    np.testing.assert_array_equal(Xc, X[3:])
    assert yc.tolist() == ["c", "c"]


def test_missing_path_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="featx extract"):
        featx.load_xy(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match="no .parquet files"):
        featx.read_features(tmp_path)


def _write_features(path, n: int, dim: int, rows_per_group: int) -> None:
    """n random rows through featx's schema and row writer, in several row groups as extract writes."""
    schema = store.feature_schema(dim, {"settings_hash": "synthetic"})
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, rows_per_group):
            rows = min(rows_per_group, n - start)
            writer.write_table(
                store.rows_table(
                    schema,
                    [f"x/{i}.jpg" for i in range(start, start + rows)],
                    ["x"] * rows,
                    [1] * rows,
                    [1] * rows,
                    rng.standard_normal((rows, dim), dtype=np.float32),
                )
            )


def _peak(fn):
    """(result, peak bytes of Python and NumPy allocations while fn ran; Arrow's own are not seen)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_load_xy_builds_no_python_float_per_value(tmp_path):
    """16 MB of features: a Python float per value would cost ~6x the matrix."""
    _write_features(tmp_path / "big.parquet", 2000, 2048, 500)
    (X, y), peak = _peak(lambda: featx.load_xy(tmp_path / "big.parquet"))
    assert X.shape == (2000, 2048) and X.dtype == np.float32 and len(y) == 2000
    assert peak < 1.5 * X.nbytes, f"{peak / X.nbytes:.1f}x the matrix"


def test_feature_matrix_builds_no_python_array_per_row(tmp_path):
    """Many short rows, where one NumPy array object per row would cost ~10x the matrix."""
    _write_features(tmp_path / "long.parquet", 50_000, 8, 10_000)
    table = store.read_table(tmp_path / "long.parquet", ["feature"])
    X, peak = _peak(lambda: store.feature_matrix(table.column("feature")))
    assert X.shape == (50_000, 8)
    assert peak < 1.5 * X.nbytes, f"{peak / X.nbytes:.1f}x the matrix"


def test_duckdb_counts_and_nearest_neighbours(one, feats):
    duckdb = pytest.importorskip("duckdb")
    counts = duckdb.sql(f"SELECT label, count(*) AS n FROM '{one}' GROUP BY label ORDER BY label").fetchall()
    assert counts == [("a", 2), ("b", 1)]
    assert duckdb.sql(f"SELECT DISTINCT len(feature) FROM '{one}'").fetchall() == [(DIM,)]
    # Rows are L2-normalised: cosine similarity is a dot product.
    files = ", ".join(f"'{f}'" for f in (feats / "one.parquet", feats / "two.parquet"))
    nearest = duckdb.sql(f"""
        SELECT b.path, list_dot_product(a.feature, b.feature) AS cosine
        FROM read_parquet([{files}]) a, read_parquet([{files}]) b
        WHERE a.path = 'a/img_000.jpg' AND b.path <> a.path
        ORDER BY cosine DESC
    """).fetchall()
    df = featx.read_features(feats)
    X = np.stack(df["feature"])
    sims = X[1:] @ X[0]
    assert [p for p, _ in nearest] == df["path"][1:].iloc[np.argsort(-sims)].tolist()
    np.testing.assert_allclose([c for _, c in nearest], np.sort(sims)[::-1], rtol=1e-5)


def test_polars_reads_arrays(one, feats):
    pl = pytest.importorskip("polars")
    df = pl.read_parquet(one)
    assert df.schema["feature"] == pl.Array(pl.Float32, DIM)
    X = df["feature"].to_numpy()
    assert X.shape == (3, DIM) and X.dtype == np.float32
    np.testing.assert_array_equal(X, featx.load_xy(one)[0])
    lazy = pl.scan_parquet([feats / "one.parquet", feats / "two.parquet"])
    counts = lazy.group_by("label").len().sort("label").collect()
    assert counts.rows() == [("a", 2), ("b", 1), ("c", 2)]


def test_hugging_face_datasets_reads_the_file(one, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=str(one), split="train", cache_dir=str(tmp_path))
    assert ds.num_rows == 3
    X = np.asarray(ds.with_format("numpy")["feature"])
    np.testing.assert_allclose(X, featx.load_xy(one)[0])


# -- folders: only finished files of one descriptor are read ----------------------------


def test_folder_read_skips_unfinished_runs(feats, tmp_path):
    folder = tmp_path / "feats"
    shutil.copytree(feats, folder)
    (folder / "three.parquet.partial").mkdir()
    shutil.copy(folder / "two.parquet", folder / "three.parquet.partial" / "rows-000000.parquet")
    assert len(featx.read_features(folder, columns=["path"])) == 5


def _copy_with_settings(src, dst, settings_hash: str, dim: int | None = None) -> None:
    """`src` rewritten as the output of another descriptor (and of another dim if given)."""
    table = pq.read_table(src)
    prov = featx.read_provenance(src) | {"settings_hash": settings_hash}
    if dim is not None:
        X = featx.load_xy(src)[0]
        table = table.set_column(
            4,
            "feature",
            pa.FixedSizeListArray.from_arrays(pa.array(np.tile(X, (1, dim // X.shape[1])).reshape(-1)), dim),
        )
    pq.write_table(table.replace_schema_metadata({store.METADATA_KEY: json.dumps(prov)}), dst)


def test_folder_read_refuses_mixed_descriptors(feats, tmp_path):
    folder = tmp_path / "feats"
    shutil.copytree(feats, folder)
    _copy_with_settings(folder / "two.parquet", folder / "three.parquet", "another-descriptor")
    with pytest.raises(ValueError, match="settings"):
        featx.load_xy(folder)


def test_folder_read_refuses_mixed_dims_with_a_value_error(feats, tmp_path):
    folder = tmp_path / "feats"
    shutil.copytree(feats, folder)
    _copy_with_settings(folder / "two.parquet", folder / "three.parquet", "another-descriptor", dim=2 * DIM)
    with pytest.raises(ValueError):
        featx.load_xy(folder)
