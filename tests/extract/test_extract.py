"""featx.extract: one row per image, features independent of batching, resume, refusal."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import featx
from featx.store import METADATA_KEY
from tests.conftest import features_by_path, write_images

SETTINGS = dict(model="vgg11", weights="random", seed=0, scales=(224,), rows_per_group=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Same-size images (so batches really form) plus a few odd sizes, in two classes."""
    root = tmp_path_factory.mktemp("images")
    write_images(root, [(300, 225)] * 5 + [(240, 320)], seed=1, label="dogs")
    write_images(root, [(300, 225)] * 3 + [(260, 230)], seed=2, label="cats")
    return root


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.parquet"
    featx.extract_features(folder, out, batch_size=1, workers=0, **SETTINGS)
    return out


def test_one_row_per_image_with_labels_and_sizes(reference, folder):
    df = featx.read_features(reference)
    assert list(df.columns) == ["path", "label", "width", "height", "feature", "file_size", "file_mtime_ns"]
    assert len(df) == 10
    assert df["path"].tolist() == sorted(df["path"])
    assert (df["label"] == df["path"].str.split("/").str[0]).all()
    row = df.set_index("path").loc["dogs/img_005.jpg"]
    assert (row["width"], row["height"]) == (240, 320)
    # Each row records the size and mtime of the file it was described from (for resume).
    st = (folder / "dogs" / "img_005.jpg").stat()
    assert (row["file_size"], row["file_mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    norms = np.linalg.norm(np.stack(df["feature"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_schema_and_provenance(reference):
    schema = pq.read_schema(reference)
    assert str(schema.field("feature").type) == "fixed_size_list<element: float>[4096]"
    meta = json.loads(schema.metadata[METADATA_KEY])
    assert meta["model"] == "vgg11" and meta["layer"] == "fc7"
    assert meta["weights"] == {"kind": "random", "seed": 0}
    assert meta["scales"] == [224] and meta["flip"] is True and meta["aggregate"] == "mean"
    assert meta["normalize"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["resize"]["antialias"] is True and meta["precision"]
    assert meta["torch"] and meta["torchvision"] and meta["featx_version"]
    assert meta["settings_hash"] == featx.descriptor_hash(featx.ExtractConfig(**SETTINGS))


def test_pandas_and_pyarrow_read_it_as_is(reference):
    table = pq.read_table(reference)
    assert table.num_rows == 10 and table.column("feature").type.list_size == 4096
    df = pd.read_parquet(reference)
    assert len(df["feature"].iloc[0]) == 4096
    X, y = featx.load_xy(reference)
    assert X.dtype == np.float32 and X.shape == (10, 4096)
    assert sorted(set(y)) == ["cats", "dogs"]
    X -= X.mean(axis=0)  # X is the caller's own array, not a read-only view of Arrow memory


@pytest.mark.parametrize("batch_size,workers", [(8, 0), (3, 2), (8, 4)])
def test_features_do_not_depend_on_batch_size_or_workers(folder, reference, tmp_path, batch_size, workers):
    out = tmp_path / "f.parquet"
    featx.extract_features(folder, out, batch_size=batch_size, workers=workers, **SETTINGS)
    a, b = features_by_path(reference), features_by_path(out)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_allclose(b[path], a[path], atol=2e-6, err_msg=path)


def test_settings_hash_ignores_speed_settings_only():
    base = featx.ExtractConfig(**SETTINGS)
    h = featx.descriptor_hash(base)
    assert featx.descriptor_hash(base.replace(batch_size=32, workers=0, device="cpu")) == h
    for change in [
        dict(scales=(256,)),
        dict(flip=False),
        dict(aggregate="stack"),
        dict(layer="fc6"),
        dict(model="vgg13"),
        dict(seed=1),
        dict(precision="fp16"),
    ]:
        assert featx.descriptor_hash(base.replace(**change)) != h, change


def test_resume_adds_only_new_images_and_equals_a_full_run(folder, reference, tmp_path):
    part = tmp_path / "in"
    shutil.copytree(folder, part)
    for f in list((part / "dogs").glob("*.jpg"))[:3]:
        f.unlink()
    out = tmp_path / "f.parquet"
    first = featx.extract_features(part, out, **SETTINGS)
    assert first.rows == 7
    shutil.copytree(folder, part, dirs_exist_ok=True)
    second = featx.extract_features(part, out, **SETTINGS)
    assert (second.new_rows, second.rows) == (3, 10)
    a, b = features_by_path(reference), features_by_path(out)
    assert sorted(b) == sorted(a)
    for path in a:
        np.testing.assert_allclose(b[path], a[path], atol=2e-6)
    third = featx.extract_features(part, out, **SETTINGS)
    assert third.new_rows == 0 and third.rows == 10


def test_other_settings_are_refused_unless_overwrite(folder, tmp_path):
    out = tmp_path / "f.parquet"
    featx.extract_features(folder / "cats", out, **SETTINGS)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"flip=True there, False now.*overwrite=True"):
        featx.extract_features(folder / "cats", out, **(SETTINGS | {"flip": False}))
    assert out.read_bytes() == before
    result = featx.extract_features(folder / "cats", out, overwrite=True, **(SETTINGS | {"flip": False}))
    assert result.rows == 4
    assert featx.read_provenance(out)["flip"] is False


def test_loose_files_have_no_label_and_extensionless_images_are_found(folder, tmp_path):
    src = next((folder / "cats").glob("*.jpg"))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "image_0001").write_bytes(src.read_bytes())  # as Caltech ships one
    (tmp_path / "in" / ".hidden.jpg").write_bytes(src.read_bytes())
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    out = tmp_path / "f.parquet"
    featx.extract_features([tmp_path / "in", src], out, **SETTINGS)
    df = featx.read_features(out)
    assert sorted(df["path"]) == ["image_0001", src.name]
    assert df["label"].isna().all()
