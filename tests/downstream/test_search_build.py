"""featx index at scale: IVF learns its lists from a bounded sample; FAISS builds on every core."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

faiss = pytest.importorskip("faiss")

from featx.downstream import ann  # noqa: E402
from featx.downstream.search import Index  # noqa: E402


def _rows(n: int) -> pd.DataFrame:
    return pd.DataFrame({"path": [f"img_{i}.jpg" for i in range(n)], "label": ["a"] * n})


class _Recording(faiss.IndexIVFFlat):
    """IndexIVFFlat that notes how many rows it is trained on and with how many threads."""

    seen: ClassVar[list] = []

    def train(self, x):
        _Recording.seen.append((len(x), faiss.omp_get_max_threads()))
        return super().train(x)


@pytest.fixture
def recording(monkeypatch):
    _Recording.seen = []
    monkeypatch.setattr(faiss, "IndexIVFFlat", _Recording)
    return _Recording.seen


def test_ivf_trains_on_a_bounded_seeded_sample(recording):
    X = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    index = Index.from_matrix(X, _rows(3000), kind="ivf", nlist=4, nprobe=4)
    assert recording[0][0] == ann.TRAIN_ROWS_PER_LIST * 4 == index.params["train_rows"]
    assert len(index) == 3000  # every row is added, not just the sample
    again = Index.from_matrix(X, _rows(3000), kind="ivf", nlist=4, nprobe=4)
    np.testing.assert_array_equal(again.search(X[:20], 5)[1], index.search(X[:20], 5)[1])  # seeded


def test_a_small_set_trains_on_every_row(recording):
    X = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    index = Index.from_matrix(X, _rows(300), kind="ivf")
    assert recording[0][0] == 300 == index.params["train_rows"]


def test_faiss_builds_on_every_core_and_gives_back_the_callers_threads(recording, monkeypatch):
    monkeypatch.setattr(ann, "build_threads", lambda: 3)  # a count no default has here
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # e.g. lowered by the caller for --jobs
    try:
        X = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
        Index.from_matrix(X, _rows(600), kind="ivf", nlist=4)
        assert recording[0][1] == 3
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)
