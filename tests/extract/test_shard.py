"""--shard K/N: a stable split by path hash that covers every image exactly once."""

from __future__ import annotations

import pytest

import featx
from featx.extract.discover import Item
from featx.extract.job import plan_job
from featx.extract.shard import parse_shard, shard, shard_of, take_shard
from tests.conftest import write_images

PATHS = [f"class_{c}/image_{i:04d}.jpg" for c in range(7) for i in range(60)]


@pytest.mark.parametrize("text,expected", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 1 / 2 ", (1, 2))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["4/4", "-1/4", "1/0", "1", "a/b", "1/2/3", ""])
def test_parse_shard_refuses_what_is_not_k_of_n(text):
    with pytest.raises(ValueError, match="K/N with 0 <= K < N"):
        parse_shard(text)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_shards_are_disjoint_and_cover_everything(n):
    parts = [shard(PATHS, k, n) for k in range(n)]
    assert sorted(p for part in parts for p in part) == sorted(PATHS)
    assert sum(len(part) for part in parts) == len(PATHS)
    # Balanced enough to split work: each shard within 30% of an equal share.
    assert all(abs(len(part) - len(PATHS) / n) <= 0.3 * len(PATHS) / n for part in parts)


def test_adding_files_moves_no_other_file():
    before = {p: shard_of(p, 4) for p in PATHS}
    grown = PATHS + [f"class_new/image_{i:04d}.jpg" for i in range(100)]
    after = {p: k for k in range(4) for p in shard(grown, k, 4)}
    assert all(after[p] == before[p] for p in PATHS)


def test_shard_keeps_order_and_accepts_items(tmp_path):
    items = [Item(tmp_path / p, p, p.split("/")[0]) for p in PATHS]
    chosen = shard(items, 1, 3)
    assert [it.path for it in chosen] == shard(PATHS, 1, 3)


def test_the_split_is_the_same_on_every_machine():
    # Pinned values: a salted hash (Python's hash()) or a changed hash would move files
    # between machines that already hold partial outputs.
    assert [shard_of(p, 1000) for p in ("a.jpg", "dogs/img_000.jpg", "Faces/image_0001.jpg")] == [449, 603, 943]


def test_an_empty_shard_is_a_user_error():
    with pytest.raises(ValueError, match="use fewer shards"):
        take_shard(["only.jpg"], (1 - shard_of("only.jpg", 2), 2))


def test_the_local_engine_keeps_only_its_shard(tmp_path):
    write_images(tmp_path / "in", [(230, 224)] * 6, seed=3, label="a")
    config = featx.ExtractConfig(model="vgg11", weights="random", scales=(224,))
    every = [it.path for it in plan_job([tmp_path / "in"], config).items]
    chosen = [[it.path for it in plan_job([tmp_path / "in"], config, shard=f"{k}/2").items] for k in range(2)]
    assert sorted(chosen[0] + chosen[1]) == every and not set(chosen[0]) & set(chosen[1])
    result = featx.extract_features(tmp_path / "in", tmp_path / "s1.parquet", config, shard="1/2")
    assert featx.read_features(result.output)["path"].tolist() == chosen[1] == shard(every, 1, 2)


def test_cli_shard_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from featx.cli import app

    write_images(tmp_path / "in", [(230, 224)], seed=3, label="a")
    r = CliRunner().invoke(
        app,
        ["extract", str(tmp_path / "in"), "-o", str(tmp_path / "f.parquet"), "--weights", "random", "--shard", "2/2"],
    )
    assert r.exit_code == 2 and "--shard '2/2' is not K/N with 0 <= K < N" in r.output
    assert "Traceback" not in r.output
