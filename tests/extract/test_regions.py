"""featx extract --regions: one row per box, equal to extracting the hand-cut crop as an image."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

import featx
from featx.cli import app
from featx.errors import BadInput, SettingsMismatch
from featx.extract.decode import ImageError, crop_box, decode_regions, open_upright
from tests.conftest import smooth_image

# pool5 at Q = 64: a random vgg11 in fp32 is cheap and exact enough to compare crops.
SETTINGS = dict(model="vgg11", weights="random", layer="pool5", scales=(64, 96), precision="fp32", workers=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    (root / "a").mkdir()
    smooth_image(rng, 200, 150).save(root / "a" / "one.png")
    smooth_image(rng, 120, 180).save(root / "a" / "two.png")
    return root


def test_crop_box_takes_exactly_the_pixels_of_the_box():
    a = np.arange(10 * 8 * 3, dtype=np.uint8).reshape(8, 10, 3)
    got = np.asarray(crop_box(Image.fromarray(a), (2, 1, 7, 5)))
    assert np.array_equal(got, a[1:5, 2:7])
    with pytest.raises(ImageError, match="outside"):
        crop_box(Image.fromarray(a), (0, 0, 11, 5))
    with pytest.raises(ImageError, match="empty"):
        crop_box(Image.fromarray(a), (3, 0, 3, 5))


def test_decode_regions_rescales_the_crop_and_keeps_the_image_size(folder):
    [d, bad] = decode_regions(folder / "a" / "one.png", [(10, 20, 110, 70), (0, 0, 201, 10)], (64,), 10**8)
    assert (d.width, d.height) == (200, 150)
    assert tuple(d.scaled[64].shape) == (3, 64, 128)  # 100x50 crop, smaller side to Q
    assert isinstance(bad, ImageError) and bad.error == "BoxOutsideImage"


def test_region_rows_equal_the_hand_cut_crops_extracted_as_images(folder, tmp_path):
    boxes = [
        ("a/one.png", "p1", 10, 20, 110, 140),
        ("a/one.png", "p2", 50, 0, 200, 150),
        ("a/two.png", "x", 5, 5, 100, 170),
    ]
    table = pd.DataFrame(boxes, columns=["path", "region", "x1", "y1", "x2", "y2"])
    table.to_csv(tmp_path / "regions.csv", index=False)
    crops = tmp_path / "crops"
    crops.mkdir()
    for path, rid, *box in boxes:
        open_upright(folder / path, 10**8).crop(tuple(box)).save(crops / f"{rid}.png")

    out = tmp_path / "regions.parquet"
    result = featx.extract_features(folder, out, regions=tmp_path / "regions.csv", **SETTINGS)
    assert result.rows == 3 and result.failures == 0
    got = featx.read_features(out)
    assert list(got.columns)[:10] == ["path", "label", "width", "height", "region", "x1", "y1", "x2", "y2", "feature"]
    assert list(zip(got["path"], got["region"])) == [("a/one.png", "p1"), ("a/one.png", "p2"), ("a/two.png", "x")]
    assert list(got.loc[0, ["width", "height", "x1", "y1", "x2", "y2"]]) == [200, 150, 10, 20, 110, 140]

    ref = tmp_path / "crops.parquet"
    featx.extract_features(crops, ref, **SETTINGS)
    expected = dict(zip(featx.read_features(ref)["path"], featx.read_features(ref)["feature"]))
    for rid, feature in zip(got["region"], got["feature"]):
        np.testing.assert_allclose(feature, expected[f"{rid}.png"], atol=1e-5)
    # The boxes differ, so must their descriptors (the crop is really taken).
    assert np.abs(got["feature"][0] - got["feature"][1]).max() > 1e-3


def test_bad_regions_are_listed_with_their_reason_and_get_no_row(folder, tmp_path):
    regions = tmp_path / "r.csv"
    regions.write_text(
        "path,x1,y1,x2,y2\n"
        "a/one.png,0,0,50,50\n"  # fine: region "0"
        "a/one.png,0,0,250,50\n"  # beyond the 200-pixel width
        "a/one.png,40,10,40,50\n"  # empty
        "a/two.png,ten,0,50,50\n"  # not a number
        "a/none.png,0,0,10,10\n"  # no such image
        "a/two.png,-1,0,10,10\n"  # left of the image
    )
    out = tmp_path / "out.parquet"
    result = featx.extract_features(folder, out, regions=regions, **SETTINGS)
    assert result.rows == 1 and result.failures == 5
    assert featx.read_features(out)["region"].tolist() == ["0"]
    errors = pq.read_table(result.errors_file).to_pandas().set_index("region")
    assert errors.loc["1", "error"] == "BoxOutsideImage" and "200x150" in errors.loc["1", "message"]
    assert errors.loc["2", "error"] == "EmptyBox"
    assert errors.loc["3", "error"] == "NotAPixel" and "'ten'" in errors.loc["3", "message"]
    assert errors.loc["4", "error"] == "FileNotFoundError" and errors.loc["4", "path"] == "a/none.png"
    assert errors.loc["5", "error"] == "BoxOutsideImage"

    # Same table again: nothing to redo. Another table: another run, refused.
    again = featx.extract_features(folder, out, regions=regions, **SETTINGS)
    assert again.new_rows == 0
    other = tmp_path / "other.csv"
    other.write_text("path,x1,y1,x2,y2\na/one.png,0,0,60,50\n")
    with pytest.raises(SettingsMismatch, match="regions"):
        featx.extract_features(folder, out, regions=other, **SETTINGS)
    with pytest.raises(SettingsMismatch, match="regions"):
        featx.extract_features(folder, out, **SETTINGS)


def test_absolute_paths_inside_the_folder_work_and_outside_is_an_error(folder, tmp_path):
    inside = pd.DataFrame({"path": [str(folder / "a" / "two.png")], "x1": [0], "y1": [0], "x2": [60], "y2": [60]})
    out = tmp_path / "abs.parquet"
    featx.extract_features(folder, out, regions=inside, **SETTINGS)
    assert featx.read_features(out)["path"].tolist() == ["a/two.png"]

    outside = pd.DataFrame(
        {"path": ["a/one.png", str(tmp_path / "elsewhere.png"), "../x.png"], "x1": 0, "y1": 0, "x2": 9, "y2": 9}
    )
    with pytest.raises(BadInput, match="elsewhere.png"):
        featx.extract_features(folder, tmp_path / "o.parquet", regions=outside, **SETTINGS)
    with pytest.raises(BadInput, match="lacks column"):
        featx.extract_features(folder, tmp_path / "o.parquet", regions=inside.drop(columns="y2"), **SETTINGS)


def test_resume_after_an_interruption_redoes_only_the_missing_regions(folder, tmp_path, monkeypatch):
    from featx.extract.local import LocalRun

    rows = [("a/one.png", i, 10 * i, 0, 10 * i + 64, 64) for i in range(5)]
    regions = pd.DataFrame(rows, columns=["path", "region", "x1", "y1", "x2", "y2"])
    out = tmp_path / "resumed.parquet"
    real_flush, calls = LocalRun.flush, []

    def flush_then_stop(self, *args):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_flush(self, *args)

    monkeypatch.setattr(LocalRun, "flush", flush_then_stop)
    first = featx.extract_features(folder, out, regions=regions, rows_per_group=2, **SETTINGS)
    assert first.interrupted and first.new_rows == 2
    monkeypatch.setattr(LocalRun, "flush", real_flush)
    second = featx.extract_features(folder, out, regions=regions, rows_per_group=2, **SETTINGS)
    assert second.new_rows == 3 and second.rows == 5
    assert featx.read_features(out)["region"].tolist() == ["0", "1", "2", "3", "4"]


def test_cli_regions(folder, tmp_path):
    regions = tmp_path / "r.parquet"
    pd.DataFrame({"path": ["a/one.png"], "region": ["p"], "x1": [0], "y1": [0], "x2": [80], "y2": [90]}).to_parquet(
        regions
    )
    out = tmp_path / "cli.parquet"
    r = CliRunner().invoke(
        app,
        [
            "extract",
            str(folder),
            "-o",
            str(out),
            "--regions",
            str(regions),
            "--model",
            "vgg11",
            "--weights",
            "random",
            "--layer",
            "pool5",
            "--scales",
            "64",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    df = featx.read_features(out)
    assert df[["region", "x1", "y1", "x2", "y2"]].values.tolist() == [["p", 0, 0, 80, 90]]
    r = CliRunner().invoke(
        app,
        [
            "extract",
            str(folder),
            "-o",
            str(tmp_path / "x.parquet"),
            "--regions",
            str(tmp_path / "missing.csv"),
            "--weights",
            "random",
        ],
    )
    assert r.exit_code == 2 and "missing.csv" in r.output


def test_vggfeatures_on_image_box_pairs_equals_the_region_rows(folder, tmp_path):
    from featx.sklearn import VGGFeatures

    boxes = [("a/one.png", 10, 20, 110, 140), ("a/two.png", 5, 5, 100, 170)]
    out = tmp_path / "r.parquet"
    table = pd.DataFrame(boxes, columns=["path", "x1", "y1", "x2", "y2"])
    featx.extract_features(folder, out, regions=table, **SETTINGS)
    rows = np.stack(featx.read_features(out)["feature"])
    vgg = VGGFeatures(model="vgg11", weights="random", layer="pool5", scales=(64, 96), precision="fp32")
    image = Image.open(folder / "a" / "two.png")
    X = vgg.fit_transform([(str(folder / "a" / "one.png"), (10, 20, 110, 140)), (image, [5, 5, 100, 170])])
    np.testing.assert_allclose(X, rows, atol=1e-5)
    with pytest.raises(BadInput, match="outside"):
        vgg.transform([(image, (0, 0, 500, 10))])


def test_a_changed_image_has_its_regions_described_again(folder, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(folder, images)
    regions = pd.DataFrame(
        [("a/one.png", 0, 0, 64, 64), ("a/one.png", 10, 10, 90, 80), ("a/two.png", 0, 0, 70, 70)],
        columns=["path", "x1", "y1", "x2", "y2"],
    )
    out = tmp_path / "r.parquet"
    featx.extract_features(images, out, regions=regions, **SETTINGS)
    before = featx.read_features(out)
    smooth_image(np.random.default_rng(9), 200, 150).save(images / "a" / "one.png")
    again = featx.extract_features(images, out, regions=regions, **SETTINGS)
    assert (again.new_rows, again.rows) == (2, 3)
    after = featx.read_features(out)
    assert after["region"].tolist() == before["region"].tolist() == ["0", "1", "2"]
    assert np.abs(after["feature"][0] - before["feature"][0]).max() > 1e-3
    np.testing.assert_array_equal(after["feature"][2], before["feature"][2])
