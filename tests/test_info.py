"""`featx info`: one screen that says what a feature file holds and how it was made."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

import featx
from featx.cli import app
from tests.conftest import write_images

runner = CliRunner()
SETTINGS = dict(model="vgg11", weights="random", layer="pool5", scales=(32,), precision="fp32")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A file with a class folder, a loose image and a broken one, and a copy beside it."""
    root = tmp_path_factory.mktemp("info")
    images = root / "images"
    write_images(images, [(40, 30), (30, 40)], seed=1, label="cats")
    write_images(images / "tmp", [(40, 30)], seed=2, label="x")
    shutil.move(images / "tmp" / "x" / "img_000.jpg", images / "loose.jpg")
    shutil.rmtree(images / "tmp")
    (images / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    out = root / "feats"
    out.mkdir()
    featx.extract_features(images, out / "a.parquet", **SETTINGS)
    shutil.copy(out / "a.parquet", out / "b.parquet")
    return out


def lines(result) -> dict[str, str]:
    assert result.exit_code == 0, result.output
    head, *rest = result.output.splitlines()
    return {"": head} | {line.split()[0]: line.split(None, 1)[1] for line in rest}


def test_info_of_a_file(folder):
    shown = lines(runner.invoke(app, ["info", str(folder / "a.parquet")]))
    assert shown[""].endswith("a.parquet: 3 rows × 512 float32, " + shown[""].rsplit(", ", 1)[1])
    assert shown["model"] == (
        "vgg11, weights random (seed 0) — RANDOM WEIGHTS: for tests and smoke runs only, not for recognition"
    )
    assert shown["layer"] == "pool5 map averaged over all positions, with its flipped image"
    assert shown["scales"] == "Q = 32, L2-normalised"
    assert "bilinear, antialiased" in shown["input"] and "[0.485, 0.456, 0.406]" in shown["input"]
    assert shown["settings"].startswith(f"hash {featx.read_provenance(folder / 'a.parquet')['settings_hash']}")
    assert shown["labels"] == "1: cats (2), and 1 image given as files, not in a class folder"
    assert shown["failures"] == f"1 image, listed in {folder / 'a.errors.parquet'}"


def test_info_of_a_folder_and_as_json(folder):
    shown = lines(runner.invoke(app, ["info", str(folder)]))
    assert "6 rows × 512 float32 in 2 files" in shown[""]
    assert shown["labels"].startswith("1: cats (4), and 2 images")
    result = runner.invoke(app, ["info", "--json", str(folder / "a.parquet")])
    assert json.loads(result.output) == featx.read_provenance(folder / "a.parquet")


def test_info_of_a_missing_file_is_one_line(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nope.parquet")])
    assert result.exit_code == 2 and "no such feature file" in result.output


def test_info_after_a_rerun_with_nothing_to_do_says_which_run_changed_the_file(folder, tmp_path):
    """A rerun that finds nothing to do leaves the file (and its record of the last change) as it is."""
    images = tmp_path / "images"
    write_images(images, [(40, 30)] * 2, seed=3, label="cats")
    out = tmp_path / "f.parquet"
    featx.extract_features(images, out, **SETTINGS)
    again = featx.extract_features(images, out, **SETTINGS)
    assert again.new_rows == 0
    run = lines(runner.invoke(app, ["info", str(out)]))["run"]
    assert run.startswith("last changed by the run finished ") and run.endswith(
        ": it added 2, replaced 0 (changed since), dropped 0 (gone since)"
    )
