"""How fast `featx index` / `featx neighbours` are: build and query times, exact against approximate.

    python benchmarks/search.py [--rows 100000] [--dim 4096] [--queries 1000] [--k 10]
                                [--data random|clustered] [--kinds flat,hnsw,ivf] [--json FILE]

One run measures, on the same L2-normalised float32 rows (fc7-sized by default) and through
featx.Index (the code the commands run):
  - exact search (FAISS flat inner product): build seconds, query ms, queries/s: the baseline;
  - each approximate kind (HNSW, IVF): build seconds, query ms, its speed-up over the exact
    index measured in the same run, and recall@k against the exact answer, measured on
    queries that are NOT rows of the index (fresh draws from the same distribution).
`--data random` is the worst case for approximate search (i.i.d. Gaussian rows: all
distances concentrate, nothing to exploit); `clustered` (rows around 1,000 centres) is closer
to real descriptors, which lie near a low-dimensional structure. Figures go to JSON too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from machine import cpu_name


def rows_like(kind: str, n: int, d: int, rng: np.random.Generator, centres: np.ndarray | None) -> np.ndarray:
    """n rows of the benchmark's distribution, in blocks (bounds the float64 temporaries)."""
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 8192):
        m = min(8192, n - s)
        block = rng.standard_normal((m, d), dtype=np.float32)
        if kind == "clustered":
            block = centres[rng.integers(0, len(centres), m)] + 0.6 * block
        out[s : s + m] = block
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--data", choices=("random", "clustered"), default="random")
    ap.add_argument("--kinds", default="flat,hnsw,ivf")
    ap.add_argument("--nlist", type=int, default=None, help="ivf lists (default: featx's, about 4 sqrt(rows))")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--ef-search", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import faiss

    from featx.downstream.search import Index

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32) if args.data == "clustered" else None
    t = time.perf_counter()
    X = rows_like(args.data, args.rows, args.dim, rng, centres)
    Q = rows_like(args.data, args.queries, args.dim, rng, centres)
    names = pd.DataFrame({"path": [f"r{i}" for i in range(args.rows)], "label": None})
    setup = time.perf_counter() - t
    machine = {
        "cpu": cpu_name(),
        "threads": faiss.omp_get_max_threads(),
        "faiss": faiss.__version__,
        "faiss_simd": faiss.get_compile_options().strip(),
        "precision": "float32 (FAISS flat/HNSW/IVF-Flat store and compare float32)",
    }
    print(
        f"{machine['cpu']}, {machine['threads']} threads, faiss {machine['faiss']} ({machine['faiss_simd']}), float32"
    )
    print(
        f"{args.rows} {args.data} rows x {args.dim}, {args.queries} queries (not in the index), k = {args.k}; "
        f"data made in {setup:.1f} s"
    )

    results = []
    truth = None
    exact_ms = None
    for kind in args.kinds.split(","):
        t = time.perf_counter()
        index = Index.from_matrix(
            X, names, kind=kind, nlist=args.nlist, nprobe=args.nprobe, ef_search=args.ef_search, recall_k=args.k
        )
        build = time.perf_counter() - t
        index.search(Q[:10], args.k)  # warm-up: first call pays thread start-up
        t = time.perf_counter()
        _, found = index.search(Q, args.k)
        query_ms = 1000 * (time.perf_counter() - t) / len(Q)
        row = {
            "kind": kind,
            "params": index.params,
            "build_s": round(build, 2),
            "query_ms": round(query_ms, 3),
            "queries_per_s": round(1000 / query_ms, 1),
        }
        if kind == "flat":
            truth, exact_ms = found, query_ms
        else:
            if truth is None:
                exact = faiss.IndexFlatIP(args.dim)
                exact.add(X)
                _, truth = exact.search(Q, args.k)
            row["recall_at_k"] = round(
                float(np.mean([len(np.intersect1d(f, g)) for f, g in zip(found, truth)]) / args.k), 4
            )
            # What `featx index` prints: recall on rows of the collection queried against it.
            row["recall_at_k_own_rows"] = index.recall["recall"]
            if exact_ms:
                row["speedup_vs_exact"] = round(exact_ms / query_ms, 1)
        results.append(row)
        extra = ""
        if "recall_at_k" in row:
            extra = (
                f", recall@{args.k} {row['recall_at_k']:.3f} (own rows as queries: "
                f"{row['recall_at_k_own_rows']:.3f})"
                + (f", {row['speedup_vs_exact']}x the exact index's query speed" if "speedup_vs_exact" in row else "")
            )
        print(
            f"  {kind:<5} {json.dumps(index.params)}: build {build:.1f} s, query {query_ms:.3f} ms "
            f"({row['queries_per_s']:.0f}/s){extra}"
        )
        del index
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine, "args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
