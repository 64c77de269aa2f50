"""Similarity search over feature files: a FAISS index of the L2-normalised descriptors.

Rows are L2-normalised (arXiv 1409.1556, Appendix B), so cosine similarity is an inner
product: the exact index is FAISS's flat inner-product index; for large sets HNSW or IVF
answer approximately, and their recall@k against the exact answer is measured when built
(featx.downstream.ann builds them).
An index is a folder: `faiss.index`, `rows.parquet` (path, label per row) and `index.json`
(kind, search parameters, measured recall, and the feature file's provenance, so that a
query image is described exactly as the rows were). Contact sheets: featx.downstream.sheet.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from featx import store
from featx.downstream.ann import KINDS, build_faiss, faiss_module, faiss_threads, measure_recall, normalized
from featx.errors import BadInput, Damaged, MissingData, SettingsMismatch, option
from featx.extract.config import ExtractConfig
from featx.store.atomic import replace_folder, temporary_folder, write_text
from featx.store.paths import check_output, make_parent
from featx.store.read import is_feature_source

INDEX_FILE, ROWS_FILE, META_FILE = "faiss.index", "rows.parquet", "index.json"
# What a table of neighbours or duplicates can be written as.
TABLE_SUFFIXES = (".parquet", ".csv")
# Query rows per FAISS call when listing duplicates: bounds the result buffers.
BLOCK = 4096


@dataclass
class Index:
    """Nearest neighbours by cosine over the rows of a feature file or folder.

    `Index.build(features)` makes one (exact by default), `save`/`load` keep it as a folder,
    `neighbours(queries, k)` answers image files, folders, feature files or a matrix.
    """

    index: object  # a faiss.Index over L2-normalised rows, inner product metric
    rows: pd.DataFrame  # path, label: row i of the index
    provenance: dict  # the `featx` metadata of the indexed features
    kind: str = "flat"
    params: dict = field(default_factory=dict)  # hnsw: m, ef_search; ivf: nlist, nprobe
    recall: dict | None = None  # approximate kinds: {"k", "queries", "recall"}
    build_seconds: float = 0.0
    images: str | None = None  # where the indexed images are (for thumbnails), if known

    # -- build -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        features: str | Path,
        kind: str = "flat",
        *,
        m: int = 32,
        ef_search: int = 128,
        nlist: int | None = None,
        nprobe: int = 32,
        recall_k: int = 10,
        seed: int = 0,
        images: str | Path | None = None,
    ) -> Index:
        """Index the rows of a feature file or folder; approximate kinds measure recall@k."""
        faiss_module()  # before reading gigabytes of rows
        table = store.read_table(features, ["path", "label", "feature"])
        if table.num_rows == 0:
            raise BadInput(f"{features} holds no rows; extract some images first")
        X = store.feature_matrix(table.column("feature"))
        rows = table.select(["path", "label"]).to_pandas()
        return cls.from_matrix(
            X,
            rows,
            store.read_provenance(features),
            kind,
            m=m,
            ef_search=ef_search,
            nlist=nlist,
            nprobe=nprobe,
            recall_k=recall_k,
            seed=seed,
            images=images,
        )

    @classmethod
    def from_matrix(
        cls,
        X: np.ndarray,
        rows: pd.DataFrame,
        provenance: dict | None = None,
        kind: str = "flat",
        *,
        m: int = 32,
        ef_search: int = 128,
        nlist: int | None = None,
        nprobe: int = 32,
        recall_k: int = 10,
        seed: int = 0,
        images: str | Path | None = None,
    ) -> Index:
        """Index the rows of X (float [n, D]; normalised here) named by `rows` (path, label)."""
        faiss = faiss_module()
        if kind not in KINDS:
            raise BadInput(f"unknown --kind {kind!r}; choose one of {', '.join(KINDS)}")
        X = normalized(X)
        n = len(X)
        if len(rows) != n:
            raise BadInput(f"{len(rows)} row names for {n} rows; give one path per row")
        t = time.perf_counter()
        with faiss_threads(faiss):
            index, params = build_faiss(faiss, X, kind, m, ef_search, nlist, nprobe, seed)
        seconds = time.perf_counter() - t
        result = cls(
            index,
            rows.reset_index(drop=True)[["path", "label"]],
            provenance or {},
            kind,
            params,
            None,
            seconds,
            str(Path(images).resolve()) if images is not None else None,
        )
        result._apply_params()
        if kind != "flat":
            with faiss_threads(faiss):
                result.recall = measure_recall(result.index, X, recall_k, seed)
        return result

    def _apply_params(self) -> None:
        # Search-time parameters are not all kept by faiss.write_index: set them on every load.
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = int(self.params["ef_search"])
        elif self.kind == "ivf":
            self.index.nprobe = int(self.params["nprobe"])

    # -- persist -------------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the index folder (its missing parents made); it appears complete, and durable, or not at all."""
        faiss = faiss_module()
        path = make_parent(check_index_output(path, overwrite=overwrite), "-o")
        tmp = temporary_folder(path)
        try:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            pq.write_table(pa.Table.from_pandas(self.rows, preserve_index=False), tmp / ROWS_FILE)
            meta = {
                "kind": self.kind,
                "params": self.params,
                "recall": self.recall,
                "rows": len(self),
                "rows_sha256": rows_fingerprint(self.rows),
                "dim": self.dim,
                "build_seconds": round(self.build_seconds, 3),
                "images": self.images,
                "provenance": self.provenance,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            replace_folder(tmp, path)  # every file fsynced before the folder takes the name
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Index:
        """An index folder written by `save` (or `featx index`); a damaged or inconsistent one is
        refused (Damaged), never searched: its rows must be the ones the index was built over."""
        faiss = faiss_module()
        path = Path(path).expanduser()
        if not (path / META_FILE).is_file():
            raise MissingData(
                f"{path}: not a featx index (no {META_FILE}); build one with `featx index FEATURES -o {path}`"
            )
        try:
            meta = json.loads((path / META_FILE).read_text())
            if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
                raise ValueError(
                    f"not an index description: kind {meta.get('kind') if isinstance(meta, dict) else meta!r}"
                )
        except (OSError, ValueError) as e:
            raise _damaged(path, META_FILE, e) from None
        try:
            index = faiss.read_index(str(path / INDEX_FILE))
        except RuntimeError:  # FAISS reports every unreadable file so, with its C++ source lines
            raise _damaged(path, INDEX_FILE, "FAISS cannot read it") from None
        try:
            rows = pq.read_table(path / ROWS_FILE).to_pandas()
            missing = {"path", "label"} - set(rows.columns)
            if missing:
                raise ValueError(f"no column {', '.join(sorted(missing))}")
        except (OSError, pa.ArrowException, ValueError) as e:
            raise _damaged(path, ROWS_FILE, e) from None
        if not len(rows) == index.ntotal == meta.get("rows", index.ntotal):
            raise _damaged(path, ROWS_FILE, f"{len(rows)} rows for the index's {index.ntotal}")
        if meta.get("rows_sha256") not in (None, rows_fingerprint(rows)):  # indexes before it have none
            raise _damaged(path, ROWS_FILE, "its rows are not the ones the index was built over (changed or reordered)")
        result = cls(
            index,
            rows,
            meta.get("provenance", {}),
            meta["kind"],
            meta.get("params", {}),
            meta.get("recall"),
            meta.get("build_seconds", 0.0),
            meta.get("images"),
        )
        result._apply_params()
        return result

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    # -- search --------------------------------------------------------------------------
    def search(self, X: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row ids), each [n, k], best first: cosine of the normalised rows of X."""
        X = normalized(X)
        if X.shape[1] != self.dim:
            raise SettingsMismatch(
                f"queries have {X.shape[1]} dimensions, the index {self.dim}; use features of the same descriptor"
            )
        if k < 1:
            raise BadInput(f"-k {k} must be at least 1")
        return self.index.search(X, min(k, len(self)))

    def neighbours(
        self,
        queries,
        k: int = 10,
        *,
        weights: str | None = None,
        device: str = "auto",
        batch_size: int = ExtractConfig.batch_size,
    ) -> pd.DataFrame:
        """The k nearest rows of each query: columns query, rank (1 first), path, label, score.

        A query is an image file (described with the settings recorded in the index's
        features), a folder of images, or a feature file of the same descriptor; or pass a
        matrix X (queries named q0, q1, ...).
        """
        if isinstance(queries, np.ndarray):
            names, X = [f"q{i}" for i in range(len(queries))], queries
        else:
            names, X = self.query_features(queries, weights=weights, device=device, batch_size=batch_size)
        scores, ids = self.search(X, k)
        return self.table(names, scores, ids)

    def table(self, names: list[str], scores: np.ndarray, ids: np.ndarray) -> pd.DataFrame:
        """The neighbours table of `search`'s answer for queries called `names`."""
        n, k = ids.shape
        keep = ids.reshape(-1) >= 0  # an approximate index may find fewer than k
        flat = np.where(keep, ids.reshape(-1), 0)
        return pd.DataFrame(
            {
                "query": np.repeat(np.asarray(names, dtype=object), k)[keep],
                "rank": np.tile(np.arange(1, k + 1), n)[keep],
                "path": self.rows["path"].to_numpy()[flat][keep],
                "label": self.rows["label"].to_numpy()[flat][keep],
                "score": scores.reshape(-1)[keep].astype(np.float32),
            }
        )

    def query_features(
        self, queries, *, weights: str | None = None, device: str = "auto", batch_size: int = ExtractConfig.batch_size
    ) -> tuple[list[str], np.ndarray]:
        """(names, X) of image files, image folders and feature files, in the order given."""
        if isinstance(queries, (str, os.PathLike)):
            queries = [queries]
        names: list[str] = []
        blocks: list[np.ndarray] = []
        images: list[Path] = []

        def flush():
            if images:
                n, X = describe_images(images, self.provenance, weights=weights, device=device, batch_size=batch_size)
                names.extend(n)
                blocks.append(X)
                images.clear()

        for q in queries:
            q = Path(q).expanduser()
            if not q.exists():
                raise MissingData(f"query {q}: no such image, folder or feature file")
            if is_feature_source(q):
                flush()
                prov = store.read_provenance(q)
                if prov.get("settings_hash") != self.provenance.get("settings_hash"):
                    raise SettingsMismatch(
                        f"query {q} holds features of another descriptor (settings hash "
                        f"{prov.get('settings_hash')}, the index's {self.provenance.get('settings_hash')}); "
                        "extract it with the index's settings or give the images"
                    )
                table = store.read_table(q, ["path", "feature"])
                names.extend(table.column("path").to_pylist())
                blocks.append(store.feature_matrix(table.column("feature")))
            elif q.is_dir():
                from featx.extract.discover import discover

                found = discover([q])
                if not found:
                    raise BadInput(f"query folder {q} holds no images")
                images.extend(q / item.path for item in found)  # named as given, folder/relative path
            else:
                images.append(q)
        flush()
        if not blocks:
            raise BadInput("no query given; name image files, folders or feature files")
        return names, np.concatenate(blocks)

    def duplicates(self, threshold: float = 0.95) -> pd.DataFrame:
        """Pairs of rows whose cosine is at least `threshold`: path_a, path_b, score (exact, best first)."""
        faiss = faiss_module()
        if not -1 <= threshold <= 1:
            raise BadInput(f"--duplicates {threshold} must be a cosine between -1 and 1, e.g. 0.95")
        X = self.vectors()
        exact = faiss.IndexFlatIP(X.shape[1])
        exact.add(X)
        a, b, s = [], [], []
        for start in range(0, len(X), BLOCK):
            # Strictly above the radius for inner products: open it by a float step.
            lims, D, ids = exact.range_search(X[start : start + BLOCK], float(np.nextafter(np.float32(threshold), -2)))
            q = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims.astype(np.int64)))
            keep = (q < ids) & (np.float32(threshold) <= D)
            a.append(q[keep])
            b.append(ids[keep])
            s.append(D[keep])
        a, b, s = (np.concatenate(v) for v in (a, b, s))
        order = np.lexsort((b, a, -s))
        paths = self.rows["path"].to_numpy()
        return pd.DataFrame(
            {"path_a": paths[a[order]], "path_b": paths[b[order]], "score": s[order].astype(np.float32)}
        )

    def vectors(self) -> np.ndarray:
        """The indexed rows, float32 [n, D]."""
        if self.kind == "ivf":
            self.index.make_direct_map()
        return self.index.reconstruct_n(0, len(self))


def check_index_output(path: str | Path, *, overwrite: bool = False) -> Path:
    """`path` if an index folder may be written there (checked before building): a new folder, or
    an index to replace with `overwrite`."""
    path = check_output(path, "-o", folder=True)
    if path.exists():
        if not (path / META_FILE).is_file():
            raise BadInput(f"-o {path} exists and is not a featx index; choose a new name")
        if not overwrite:
            raise BadInput(f"-o {path} already holds an index; pass {option('overwrite')} to replace it")
    return path


def rows_fingerprint(rows: pd.DataFrame) -> str:
    """A hash of the indexed rows' paths and labels, in index order: row i must name vector i."""
    h = hashlib.sha256()
    for p, label in zip(rows["path"], rows["label"]):
        h.update(f"{p}\0{label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _damaged(path: Path, name: str, why) -> Damaged:
    return Damaged(
        f"{path / name} is damaged ({why}); build the index again: featx index FEATURES -o {path} --overwrite",
        path / name,
    )


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """A neighbours or duplicates table as Parquet or CSV (by the suffix), missing folders made,
    complete or not at all."""
    path = make_parent(check_output(path, "-o", suffix=TABLE_SUFFIXES), "-o")
    if path.suffix.lower() == ".csv":
        write_text(table.to_csv(index=False), path)
    else:
        store.write_atomic(pa.Table.from_pandas(table, preserve_index=False), path)
    return path


def describe_images(
    files: list[Path],
    provenance: dict,
    *,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int = ExtractConfig.batch_size,
) -> tuple[list[str], np.ndarray]:
    """(names, X) of image files, described with the settings a feature file records."""
    from featx.extract.decode import ImageError
    from featx.extract.describer import make_describer
    from featx.extract.discover import Item
    from featx.extract.provenance import config_from_provenance
    from featx.extract.rowgroup import decode_item, describe_group

    config = config_from_provenance(provenance, weights=weights, device=device, batch_size=batch_size)
    describer = make_describer(config, cache=True)
    items = [Item(Path(f).resolve(), str(f), None) for f in files]
    decoded = []
    for item in items:
        d = decode_item(item, config)
        if isinstance(d, ImageError):
            raise BadInput(f"query {item.path}: {d.message}; give an image Pillow can open")
        decoded.append(d)
    X, failed = describe_group(describer, decoded, config)
    if failed:
        i, e = next(iter(failed.items()))
        raise BadInput(f"query {items[i].path} could not be described ({e.error}: {e.message})")
    return [item.path for item in items], X
