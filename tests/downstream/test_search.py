"""`featx index` / `featx neighbours`: FAISS search over feature files (generated rows; one small CLI run)."""

from __future__ import annotations

import builtins
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import featx
from featx.cli import app
from featx.downstream.search import Index, faiss_module
from featx.errors import BadInput, MissingData, SettingsMismatch

runner = CliRunner()


def rows(n: int) -> pd.DataFrame:
    return pd.DataFrame({"path": [f"img{i:04d}.jpg" for i in range(n)], "label": [f"c{i % 5}" for i in range(n)]})


def clustered(n: int, d: int, centres: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    return (c[rng.integers(0, centres, n)] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)


def brute_force(X: np.ndarray, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    S = Qn.astype(np.float64) @ Xn.T.astype(np.float64)
    top = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, top, axis=1), top


def test_exact_index_is_brute_force_cosine_top_k():
    X = clustered(600, 48) * np.random.default_rng(1).uniform(0.5, 3, (600, 1)).astype(np.float32)  # not unit rows
    Q = clustered(30, 48, seed=5)
    index = Index.from_matrix(X, rows(600))
    scores, ids = index.search(Q, 7)
    want_scores, want_ids = brute_force(X, Q, 7)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    table = index.neighbours(Q[:2], k=3)
    assert list(table.columns) == ["query", "rank", "path", "label", "score"]
    assert table["rank"].tolist() == [1, 2, 3, 1, 2, 3]
    assert table["path"].tolist()[:3] == [f"img{i:04d}.jpg" for i in want_ids[0, :3]]


@pytest.mark.parametrize("kind, params", [("hnsw", dict(m=8, ef_search=8)), ("ivf", dict(nlist=30, nprobe=1))])
def test_approximate_recall_is_reported_honestly(kind, params):
    X = clustered(900, 32, centres=60)
    index = Index.from_matrix(X, rows(900), kind=kind, recall_k=10, **params)
    # Fewer rows than the recall sample: every row is a query, so the figure can be recomputed.
    _, truth = brute_force(X, X, 10)
    _, found = index.search(X, 10)
    recomputed = np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth)])
    assert index.recall["queries"] == 900 and index.recall["k"] == 10
    assert index.recall["recall"] == pytest.approx(recomputed, abs=2e-3)  # ties at equal scores may swap
    assert 0.2 < index.recall["recall"] <= 1.0


def test_save_load_round_trip_and_refusals(tmp_path):
    X = clustered(300, 16)
    index = Index.from_matrix(X, rows(300), {"settings_hash": "abc"}, kind="ivf", nlist=8, nprobe=8)
    index.save(tmp_path / "ix")
    back = Index.load(tmp_path / "ix")
    assert (back.kind, back.params, back.recall, len(back), back.provenance) == (
        "ivf",
        index.params,
        index.recall,
        300,
        {"settings_hash": "abc"},
    )
    np.testing.assert_array_equal(back.search(X[:5], 4)[1], index.search(X[:5], 4)[1])
    with pytest.raises(BadInput, match="pass overwrite=True"):
        index.save(tmp_path / "ix")
    (tmp_path / "other").mkdir()
    with pytest.raises(BadInput, match="not a featx index"):
        index.save(tmp_path / "other", overwrite=True)
    with pytest.raises(MissingData, match="featx index FEATURES"):
        Index.load(tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix", "other"]  # no temporary left behind


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_duplicates_are_the_exact_pairs_above_the_threshold(kind):
    X = clustered(200, 24)
    X[150:160] = X[:10] + 0.01 * np.random.default_rng(3).standard_normal((10, 24)).astype(np.float32)
    pairs = Index.from_matrix(X, rows(200), kind=kind).duplicates(0.99)
    _S, _ = brute_force(X, X, 200)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    G = Xn @ Xn.T
    want = {(f"img{i:04d}.jpg", f"img{j:04d}.jpg") for i, j in zip(*np.nonzero(np.triu(G >= 0.99, 1)))}
    assert set(zip(pairs["path_a"], pairs["path_b"])) == want and len(want) >= 10
    assert pairs["score"].is_monotonic_decreasing


def test_missing_faiss_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(MissingData, match=r"pip install 'featx\[search\]'"):
        faiss_module()
    result = runner.invoke(app, ["index", str(tmp_path / "f.parquet"), "-o", str(tmp_path / "ix")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "featx: error: similarity search needs FAISS, which is not installed; pip install 'featx[search]' (faiss-cpu)"
    ]


def test_config_from_provenance_needs_the_weights_file():
    from featx.extract.provenance import config_from_provenance

    prov = {
        "settings": {
            "model": "vgg16",
            "layer": "fc7",
            "scales": [256],
            "flip": True,
            "aggregate": "mean",
            "precision": "fp32",
            "bucket": 0,
            "weights": {"kind": "file", "file": "mine.pth", "sha256": "ab" * 32},
        }
    }
    with pytest.raises(MissingData, match="mine.pth.*weights=FILE"):
        config_from_provenance(prov)


@pytest.fixture(scope="module")
def samples_file(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "samples.parquet"
    featx.extract_features(samples, out, model="vgg11", weights="random", scales=(224,))
    return out


@pytest.mark.slow
def test_cli_an_image_from_the_collection_finds_itself_first(samples, samples_file, tmp_path):
    from featx.extract.provenance import config_from_provenance, descriptor_hash

    prov = featx.read_provenance(samples_file)
    assert descriptor_hash(config_from_provenance(prov)) == prov["settings_hash"]
    ix = tmp_path / "ix"
    result = runner.invoke(app, ["index", str(samples_file), "-o", str(ix), "--images", str(samples)])
    assert result.exit_code == 0, result.output
    assert "12 rows × 4096, flat index" in result.output
    query = samples / "crab" / "image_0002.jpg"
    out = tmp_path / "n.csv"
    result = runner.invoke(
        app,
        [
            "neighbours",
            str(ix),
            str(query),
            str(samples / "anchor"),
            "-k",
            "3",
            "-o",
            str(out),
            "--sheet",
            str(tmp_path / "sheet.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert list(table.columns) == ["query", "rank", "path", "label", "score"] and len(table) == 4 * 3
    first = table[table["rank"] == 1]
    assert [p.split("/")[-2:] for p in first["query"]] == [p.split("/") for p in first["path"]]
    assert (first["score"] > 0.999).all()
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.width > 400 and sheet.height > 4 * 150
    # A feature file of another descriptor is refused, naming both hashes.
    other = tmp_path / "other.parquet"
    featx.extract_features(samples / "crab", other, model="vgg11", weights="random", scales=(224,), flip=False)
    result = runner.invoke(app, ["neighbours", str(ix), str(other)])
    assert result.exit_code == 2 and "another descriptor" in result.output
    assert isinstance(SettingsMismatch("x"), BadInput)


def test_cli_index_queries_by_feature_file_and_lists_duplicates(tmp_path):
    from featx import store

    X = clustered(40, 16)
    X[30] = X[3]
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    prov = {"settings_hash": "f" * 16, "dim": 16, "model": "vgg16", "weights": {"kind": "random", "seed": 0}}
    paths = [f"c/{i:02d}.jpg" for i in range(40)]
    store.write_atomic(
        store.rows_table(store.feature_schema(16, prov), paths, ["c"] * 40, [1] * 40, [1] * 40, X),
        tmp_path / "f.parquet",
    )
    result = runner.invoke(app, ["index", str(tmp_path / "f.parquet"), "-o", str(tmp_path / "ix"), "--kind", "hnsw"])
    assert result.exit_code == 0, result.output
    # HNSW's recall on 40 rows varies with faiss's version (0.990 on faiss-cpu 1.8, 1.000 later): a floor, not a value
    recall = re.search(r"recall@10 against exact search: ([0-9.]+) \(40 of the rows as queries", result.output)
    assert recall and float(recall.group(1)) >= 0.95, result.output
    result = runner.invoke(
        app,
        ["neighbours", str(tmp_path / "ix"), str(tmp_path / "f.parquet"), "-k", "2", "-o", str(tmp_path / "n.parquet")],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "n.parquet")
    first = table[table["rank"] == 1]
    assert (
        len(first) == 40 and ((first["query"] == first["path"]) | first["query"].isin(["c/03.jpg", "c/30.jpg"])).all()
    )
    result = runner.invoke(app, ["neighbours", str(tmp_path / "ix"), "--duplicates", "0.999"])
    assert result.exit_code == 0 and "c/03.jpg c/30.jpg" in " ".join(result.output.split())
    result = runner.invoke(app, ["neighbours", str(tmp_path / "ix"), "--duplicates", "2"])
    assert result.exit_code == 2 and "between -1 and 1" in result.output


def test_save_makes_missing_folders_and_replaces_an_index_whole(tmp_path):
    X = clustered(50, 8)
    first = Index.from_matrix(X, rows(50))
    first.save(tmp_path / "new" / "ix")
    second = Index.from_matrix(X[:20], rows(20))
    second.save(tmp_path / "new" / "ix", overwrite=True)
    assert len(Index.load(tmp_path / "new" / "ix")) == 20
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["ix"]  # nothing left beside it


def test_a_ray_style_feature_folder_is_a_query(tmp_path):
    from featx import store

    X = clustered(12, 16)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    prov = {"settings_hash": "e" * 16, "dim": 16, "model": "vgg16", "weights": {"kind": "random", "seed": 0}}
    folder = tmp_path / "parts"
    folder.mkdir()
    paths = [f"c/{i:02d}.jpg" for i in range(12)]
    schema = store.feature_schema(16, prov)
    store.write_atomic(
        store.rows_table(schema, paths, ["c"] * 12, [1] * 12, [1] * 12, X), folder / "part-000000.parquet"
    )
    (folder / "_featx").mkdir()  # the engine's bookkeeping: not an image, not a feature file
    (folder / "_featx" / "settings.json").write_text("{}")
    index = Index.from_matrix(X, pd.DataFrame({"path": paths, "label": "c"}), prov)
    hits = index.neighbours([folder], k=1)
    assert (hits["query"] == hits["path"]).all() and len(hits) == 12
