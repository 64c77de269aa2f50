"""FAISS indexes made from the data: the kind's parameters, IVF's training sample, every core
for the build (the caller's thread count restored), rows normalised once, recall measured
against exact search. featx.downstream.search keeps, saves and queries what is built here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from featx.errors import BadInput, MissingData

KINDS = ("flat", "hnsw", "ivf")
# Rows of the collection used as queries to measure an approximate index's recall.
RECALL_QUERIES = 1000
# IVF's k-means learns its lists from at most this many rows per list, a seeded sample: FAISS
# wants >= 39 per list and its docs 30-256; on every row, 1M rows (4,000 lists) cost minutes more.
TRAIN_ROWS_PER_LIST = 50


def faiss_module():
    """The faiss module, or one line naming the extra that installs it."""
    try:
        import faiss
    except ImportError:
        raise MissingData(
            "similarity search needs FAISS, which is not installed; pip install 'featx[search]' (faiss-cpu)"
        ) from None
    return faiss


def build_faiss(faiss, X: np.ndarray, kind: str, m: int, ef_search: int, nlist: int | None, nprobe: int, seed: int):
    """(a faiss index holding the rows of X, its parameters), parameters chosen from the data."""
    n, d = X.shape
    if kind == "flat":
        index, params = faiss.IndexFlatIP(d), {}
    elif kind == "hnsw":
        if m < 4:
            raise BadInput(f"--m {m} is too small for HNSW; use 16-64")
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * m)
        params = {"m": m, "ef_construction": index.hnsw.efConstruction, "ef_search": ef_search}
    else:
        # FAISS's rule of thumb: about 4 * sqrt(n) lists, each trained on >= 39 points.
        nlist = nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))
        if not 1 <= nlist <= n:
            raise BadInput(f"--nlist {nlist} must be between 1 and the {n} rows")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        train = training_rows(n, nlist, seed)
        index.train(X if train is None else X[train])
        params = {"nlist": nlist, "nprobe": min(nprobe, nlist), "train_rows": n if train is None else len(train)}
    index.add(X)
    return index, params


def training_rows(n: int, nlist: int, seed: int) -> np.ndarray | None:
    """The sorted rows IVF's k-means learns from (a seeded sample), or None for all n rows."""
    size = TRAIN_ROWS_PER_LIST * nlist
    if n <= size:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def build_threads() -> int:
    """The threads FAISS builds and measures with: every core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def faiss_threads(faiss) -> Iterator[None]:
    """FAISS's OpenMP threads at every core for the block, the caller's count restored after
    (torch or a user may have lowered the process-wide count, e.g. to one per --jobs worker)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(build_threads())
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def normalized(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32, C-contiguous (what FAISS takes)."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0:
        raise BadInput(f"features must be a non-empty [n, D] matrix, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise BadInput("features contain NaN or infinity; extract them again")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if np.all(np.abs(norms - 1) < 1e-5):  # featx's rows already are: no second copy of a large matrix
        return np.ascontiguousarray(X)
    return np.ascontiguousarray(X / np.maximum(norms, 1e-12))


def measure_recall(index, X: np.ndarray, k: int = 10, seed: int = 0, queries: int = RECALL_QUERIES) -> dict:
    """recall@k of the faiss `index` of X's rows against exact search, queried with a seeded sample of them.

    recall@k = |approximate top k ∩ exact top k| / k, averaged over the queries.
    """
    faiss = faiss_module()
    k = min(k, len(X))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(X), size=min(queries, len(X)), replace=False))
    exact = faiss.IndexFlatIP(X.shape[1])
    exact.add(X)
    _, truth = exact.search(X[sample], k)
    t = time.perf_counter()
    _, found = index.search(X[sample], k)
    seconds = time.perf_counter() - t
    hits = [len(np.intersect1d(f[f >= 0], t_)) for f, t_ in zip(found, truth)]
    return {
        "k": k,
        "queries": len(sample),
        "recall": float(np.mean(hits) / k),
        "query_ms": round(1000 * seconds / len(sample), 4),
    }
