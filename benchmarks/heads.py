"""How the linear heads scale: `featx probe`'s torch head in memory and streamed, against liblinear.

    python benchmarks/heads.py [--quick] [--rows 100000] [--dim 4096] [--classes 100]
                               [--stream-rows 1000000] [--compare-rows 20000] [--parts 1,2,3]
                               [--dir DIR] [--json FILE]

Data: synthetic descriptors, Gaussian around one random centre per class (--spread: the noise's
scale against the centres'; 10 leaves the 100-class problem far from separable) and
L2-normalised, written once as featx feature files (64-row row groups, as featx extract
writes them) into --dir (default: a temporary folder, removed afterwards; a --dir keeps them
for the next run). Every measurement runs in a fresh process, which reports its own peak RSS.

1. `featx probe --solver scalable` on rows x dim, classes classes, one split (20% tested), C
   chosen from featx's grid on a held-out 20% of the training rows, refit: wall time, peak RSS
   of the whole process against the float32 matrix, passes over the rows.
2. Streamed: LinearHead over a feature folder read from disk for every pass (--solver
   streamed), at 1/4, 1/2 and all of --stream-rows rows: seconds per pass (a pass = an epoch:
   the objective and its gradient over every row), the read alone, peak RSS at each size (flat
   in the rows), and the projected time of a whole streamed probe at the full size (part 1's
   passes per split times the seconds per pass: L-BFGS's passes follow the problem's
   conditioning, not its row count, once rows far exceed dimensions).
3. Accuracy: `featx probe` on --compare-rows rows with liblinear (exact) and the torch head
   (scalable), one split each: test accuracy, C, time.

--quick runs every part on tiny sizes to check that the script works (the tests run it); its
figures mean nothing. Precision: float32 throughout (features, weights, products).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_isa, cpu_name

ROW_GROUP = 64  # featx extract's rows_per_group


def write_features(path: Path, rows: int, dim: int, classes: int, seed: int, spread: float) -> Path:
    """A featx feature file of clustered, L2-normalised rows (written block by block)."""
    import pyarrow.parquet as pq

    from featx import store

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((classes, dim), dtype=np.float32)
    prov = {"settings_hash": "b" * 16, "dim": dim, "model": "synthetic", "descriptor": "clustered"}
    schema = store.feature_schema(dim, prov)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema, **store.parquet_options(schema)) as writer:
        for start in range(0, rows, 16_384):
            m = min(16_384, rows - start)
            y = rng.integers(0, classes, m)
            X = centres[y] + spread * rng.standard_normal((m, dim), dtype=np.float32)
            X /= np.linalg.norm(X, axis=1, keepdims=True)
            labels = [f"class{c:03d}" for c in y]
            paths = [f"{label}/{seed}-{start + i:07d}.jpg" for i, label in enumerate(labels)]
            table = store.rows_table(schema, paths, labels, [1] * m, [1] * m, X)
            writer.write_table(table, row_group_size=ROW_GROUP)
    tmp.replace(path)
    return path


def child(kind: str, spec: dict) -> dict:
    """One measurement in this (fresh) process; returns its figures and peak RSS."""
    t0 = time.perf_counter()
    if kind == "probe":
        import featx

        result = featx.probe(spec["file"], splits=1, solver=spec["solver"])
        split = result.report["splits"][0]
        out = {
            "seconds": time.perf_counter() - t0,
            "accuracy": split["accuracy"],
            "C": split["C"],
            "head_solver": split["head_solver"],
            "solver": split["solver"],
        }
    else:  # "stream": passes of the torch head over a folder read from disk
        import pyarrow.compute as pc

        from featx.evaluate.linear import LinearHead
        from featx.evaluate.rows import StoredRows
        from featx.store import read_table

        labels = read_table(spec["folder"], ["label"]).column("label")
        y = pc.dictionary_encode(labels).combine_chunks().indices.to_numpy()
        rows = StoredRows(spec["folder"], np.arange(len(y)), spec["dim"])
        before = _rss()
        t = time.perf_counter()
        read = sum(len(piece) for _, piece in rows.pieces())
        read_seconds = time.perf_counter() - t
        t = time.perf_counter()
        head = LinearHead("svm", 1.0, max_iter=spec["iterations"], device="auto").fit(rows, y)
        out = {
            "rows": read,
            "read_seconds": read_seconds,
            "seconds_per_pass": (time.perf_counter() - t) / head.n_passes_,
            "passes": head.n_passes_,
            "rss_after_labels": before,
            "device": head.device_,
        }
    out["peak_rss"] = _rss()
    return out


def _rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_child(kind: str, spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def machine_line() -> str:
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"machine: {cpu_name()} ({cpu_isa()}), {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, {gb(memory)} memory, GPU: {gpu}; precision: float32"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script works")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--stream-rows", type=int, default=1_000_000)
    ap.add_argument("--compare-rows", type=int, default=20_000)
    ap.add_argument("--spread", type=float, default=10.0, help="noise around the class centres (harder above)")
    ap.add_argument("--parts", default="1,2,3", help="which of the three measurements to run")
    ap.add_argument("--dir", type=Path, default=None, help="keep the generated files here (reused next time)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return
    if args.quick:
        args.rows, args.dim, args.classes, args.stream_rows, args.compare_rows = 3_000, 64, 10, 4_000, 2_000
    folder = args.dir or Path(tempfile.mkdtemp(prefix="featx-heads-"))
    folder.mkdir(parents=True, exist_ok=True)
    figures: dict = {"machine": machine_line()}
    print(figures["machine"])
    try:
        figures |= run(args, folder)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


def run(args, folder: Path) -> dict:
    figures = {}
    d, k = args.dim, args.classes
    tag = f"{d}d-{k}c-s{args.spread:g}"
    parts = {int(p) for p in args.parts.split(",")}
    if 1 in parts:
        figures |= whole_probe(args, folder, tag)
    if 2 in parts:
        figures |= streamed(args, folder, tag, figures.get("probe", {}).get("solver"))
    if 3 in parts:
        figures |= compared(args, folder, tag)
    return figures


def whole_probe(args, folder: Path, tag: str) -> dict:
    """Part 1: the whole probe on the scalable head, rows in memory."""
    d, k = args.dim, args.classes
    t = time.perf_counter()
    f = write_features(folder / f"probe-{args.rows}-{tag}.parquet", args.rows, d, k, 1, args.spread)
    print(
        f"\n1. featx probe --solver scalable, {args.rows:,} x {d:,}, {k} classes, one split (data written in "
        f"{time.perf_counter() - t:.0f} s)"
    )
    matrix = 4 * args.rows * d
    p = run_child("probe", {"file": str(f), "solver": "scalable"})
    s = p["solver"]
    print(
        f"   {p['seconds']:.1f} s including C selection over 5 C; peak RSS {gb(p['peak_rss'])} = "
        f"{p['peak_rss'] / matrix:.2f} x the float32 matrix ({gb(matrix)})"
    )
    print(
        f"   {p['head_solver']} on {s['device']} ({s['threads']} threads): C = {p['C']:g}, test accuracy "
        f"{p['accuracy']:.2f}%, passes over the rows: {s['holdout_passes']} held-out fits + {s['passes']} refit"
    )
    return {"probe": p | {"rows": args.rows, "dim": d, "classes": k, "matrix_bytes": matrix}}


def streamed(args, folder: Path, tag: str, fit: dict | None) -> dict:
    """Part 2: passes over 1/4, 1/2 and all of the rows read from disk (a folder of quarter parts)."""
    d, k = args.dim, args.classes
    quarter = args.stream_rows // 4
    parts = []
    t = time.perf_counter()
    for i in range(4):
        parts.append(write_features(folder / f"part-{quarter}-{tag}-{i}.parquet", quarter, d, k, 10 + i, args.spread))
    print(
        f"\n2. streamed (LinearHead over the feature files, read from disk for every pass; data written in "
        f"{time.perf_counter() - t:.0f} s)"
    )
    runs = []
    for n_parts in (1, 2, 4):
        sub = folder / f"stream-{n_parts * quarter}-{tag}"
        sub.mkdir(exist_ok=True)
        for part in parts[:n_parts]:
            link = sub / part.name
            if not link.exists():
                link.symlink_to(part)
        r = run_child("stream", {"folder": str(sub), "dim": d, "iterations": 3})
        rate = r["rows"] / r["seconds_per_pass"]
        print(
            f"   {r['rows']:>9,} rows: {r['seconds_per_pass']:.1f} s per pass ({rate:,.0f} rows/s; the read alone "
            f"{r['read_seconds']:.1f} s), peak RSS {gb(r['peak_rss'])} (after reading the labels "
            f"{gb(r['rss_after_labels'])}), on {r['device']}"
        )
        runs.append(r)
    out = {"streamed": runs}
    if fit is not None:
        per_pass, passes = runs[-1]["seconds_per_pass"], fit["holdout_passes"] + fit["passes"]
        out["projection_hours"] = passes * per_pass / 3600
        print(
            f"   projection, a streamed probe of {runs[-1]['rows']:,} rows (one split): {passes} passes as in part 1 "
            f"x {per_pass:.1f} s = {out['projection_hours']:.1f} h, plus a forward pass per C to score"
        )
    return out


def compared(args, folder: Path, tag: str) -> dict:
    """Part 3: the torch head's test accuracy against liblinear's, on a problem small enough for both."""
    d, k = args.dim, args.classes
    f = write_features(folder / f"compare-{args.compare_rows}-{tag}.parquet", args.compare_rows, d, k, 2, args.spread)
    print(f"\n3. test accuracy, {args.compare_rows:,} x {d:,}, {k} classes, one split")
    runs = {}
    for solver in ("exact", "scalable"):
        r = run_child("probe", {"file": str(f), "solver": solver})
        print(
            f"   {solver:>8} ({r['head_solver']}): {r['accuracy']:.2f}%, C = {r['C']:g}, {r['seconds']:.1f} s, "
            f"peak RSS {gb(r['peak_rss'])}"
        )
        runs[solver] = r
    gap = runs["scalable"]["accuracy"] - runs["exact"]["accuracy"]
    print(f"   torch head - liblinear: {gap:+.2f} points")
    return {"compare": runs, "accuracy_gap_points": gap}


if __name__ == "__main__":
    main()
