"""What a large collection costs outside the model: discovery, planning, merge, info, index.

    python benchmarks/scale.py                       # 100k files, 1M rows of 64-D (and a tenth of each)
    python benchmarks/scale.py --files 2000 --rows 20000 --stages plan merge info   # a quick check
    python benchmarks/scale.py --rows 100000 --dim 4096 --stages info index-ivf  # wide rows

Synthetic inputs, no net: the files are hard links to tiny JPEGs (one inode per LINKS_PER_INODE
files: file systems cap an inode's links, ext4 at 65,000; little disk),
the rows are zeros-and-noise features written with featx's store writer. Every stage runs at
two sizes (a tenth and the whole) in a fresh process of its own, so its peak RSS is its own;
seconds and microseconds per row at both sizes show any growth faster than linear.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from machine import cpu_isa, cpu_name

STAGES = ("plan", "merge", "resume", "merge-file", "info", "index-ivf", "index-hnsw")
PER_FOLDER = 1000  # images per class folder, as a large photo collection is laid out
ROWS_PER_GROUP = 64  # featx extract's default --rows-per-group: how its files are grouped
LINKS_PER_INODE = 10_000  # well under ext4's 65,000 links per inode
PART_ROWS = 1000  # rows per part of the dataset folder (and per piece of the single file)
PROVENANCE = {"settings_hash": "scale-benchmark", "model": "vgg16", "layer": "fc7"}


def make_files(root: Path, n: int) -> Path:
    """n images under root/images: hard links to tiny JPEGs, PER_FOLDER per class folder."""
    from PIL import Image

    images = root / f"images-{n}"
    if images.exists():
        return images
    for i in range(n):
        one = root / f"one-{i // LINKS_PER_INODE}.jpg"
        if not one.exists():
            Image.new("RGB", (8, 8), (90, 120, 150)).save(one)
        folder = images / f"class_{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True)
        os.link(one, folder / f"img_{i:07d}.jpg")
    return images


def make_rows(path: Path, n: int, dim: int) -> Path:
    """A feature file of n rows × dim in featx's schema, in groups of ROWS_PER_GROUP."""
    from featx.store import feature_schema, parquet_options, rows_table

    if path.exists():
        return path
    schema = feature_schema(dim, PROVENANCE | {"dim": dim})
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, schema, **parquet_options(schema)) as writer:
        for start in range(0, n, 65536):
            m = min(65536, n - start)
            X = rng.standard_normal((m, dim), dtype=np.float32)
            X /= np.linalg.norm(X, axis=1, keepdims=True)
            paths = [f"class_{(start + i) // PER_FOLDER:04d}/img_{start + i:07d}.jpg" for i in range(m)]
            labels = [p.split("/")[0] for p in paths]
            ones = np.ones(m, np.int32)
            writer.write_table(rows_table(schema, paths, labels, ones, ones, X), row_group_size=ROWS_PER_GROUP)
    return path


# -- one stage, in a process of its own ---------------------------------------------------------


def _plan(images: Path, out: Path) -> dict:
    from featx.extract.config import ExtractConfig
    from featx.extract.job import plan_job
    from featx.store import DatasetFolder

    config = ExtractConfig(model="vgg16", weights="random", layer="pool5", scales=(32,))
    t = time.perf_counter()
    job = plan_job([images], config)
    discovered = time.perf_counter() - t
    todo = job.todo(DatasetFolder(out), PROVENANCE)
    return {"rows": len(job.items), "todo": len(todo), "discovery_s": discovered}


def _merge(images: Path, out: Path, dim: int, single_file: bool = False) -> dict:
    """Pieces written as the engines write them (untimed), then the output's finish (timed):
    a dataset folder's (--engine ray), or with `single_file` the one file's merge (local)."""
    from featx.extract.config import ExtractConfig
    from featx.extract.job import plan_job
    from featx.store import DatasetFolder, SingleFile, feature_schema, rows_table

    job = plan_job([images], ExtractConfig(model="vgg16", weights="random", layer="pool5", scales=(32,)))
    schema = feature_schema(dim, PROVENANCE | {"dim": dim})
    folder = SingleFile(out.with_suffix(".parquet")) if single_file else DatasetFolder(out)
    with folder:
        todo = job.todo(folder, PROVENANCE)
        X = np.zeros((PART_ROWS, dim), np.float32)
        for i, s in enumerate(range(0, len(todo), PART_ROWS)):
            part = todo[s : s + PART_ROWS]
            ones = [1] * len(part)
            rows = rows_table(schema, [it.path for it in part], [it.label for it in part], ones, ones, X[: len(part)])
            folder.add(rows, [], index=i)
        t = time.perf_counter()
        finished = folder.finish(schema) if single_file else folder.finish()
        return {"rows": finished.rows, "timed_s": time.perf_counter() - t}


def _resume(images: Path, out: Path) -> dict:
    """Planning a rerun over a finished folder: every image's stat against every recorded row."""
    r = _plan(images, out)
    assert r["todo"] == 0, r
    return r


def _info(rows_file: Path) -> dict:
    from featx.store import feature_info

    info = feature_info(rows_file)
    return {"rows": info.rows, "labels": len(info.labels)}


def _index(rows_file: Path, kind: str) -> dict:
    from featx.downstream.search import Index

    index = Index.build(rows_file, kind=kind)
    return {"rows": len(index), "build_s": index.build_seconds, "params": index.params, "recall": index.recall}


def stage(args) -> None:
    # Imports are start-up, not the stage's cost.
    import featx.extract.job
    import featx.store  # noqa: F401

    t = time.perf_counter()
    if args.stage == "plan":
        r = _plan(args.images, args.out)
    elif args.stage in ("merge", "merge-file"):
        r = _merge(args.images, args.out, args.dim, single_file=args.stage == "merge-file")
    elif args.stage == "resume":
        r = _resume(args.images, args.out)
    elif args.stage == "info":
        r = _info(args.rows_file)
    else:
        r = _index(args.rows_file, args.stage.split("-")[1])
    r["seconds"] = r.pop("timed_s", time.perf_counter() - t)
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(r, default=str))


# -- the benchmark ------------------------------------------------------------------------------


def run_stage(name: str, **paths) -> dict:
    cmd = [sys.executable, __file__, "--stage", name] + [f"--{k.replace('_', '-')}={v}" for k, v in paths.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"stage {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000, help="images for plan, merge, resume")
    parser.add_argument("--rows", type=int, default=1_000_000, help="feature rows for info and index")
    parser.add_argument("--dim", type=int, default=64, help="feature dimension (4096 is VGG's fc7)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--dir", type=Path, help="where to build the inputs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    # One stage in this process (used by the benchmark itself).
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        return stage(args)

    print(f"machine: {cpu_name()} ({cpu_isa()}), {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        for stage_name in args.stages:
            on_rows = stage_name in ("info", "index-ivf", "index-hnsw")
            total = args.rows if on_rows else args.files
            for n in (max(1, total // 10), total):
                t = time.perf_counter()
                if on_rows:
                    rows_file = make_rows(root / f"rows-{n}-{args.dim}.parquet", n, args.dim)
                    paths = {"rows_file": rows_file}
                else:
                    images = make_files(root, n)
                    out = root / f"out-{n}"  # merge writes it, resume plans over it
                    paths = {"images": images, "out": out}
                    if stage_name == "plan":
                        paths["out"] = root / f"fresh-{n}"
                    if stage_name == "resume" and not out.exists():
                        run_stage("merge", images=images, out=out, dim=args.dim)
                    if stage_name in ("merge", "merge-file"):
                        paths["dim"] = args.dim
                    if stage_name == "merge-file":
                        paths["out"] = root / f"file-{n}"
                setup = time.perf_counter() - t
                r = run_stage(stage_name, **paths)
                r |= {"stage": stage_name, "n": n, "us_per_row": 1e6 * r["seconds"] / n, "setup_s": setup}
                results.append(r)
                print(
                    f"{stage_name:<11} n={n:>9,}  {r['seconds']:8.2f} s  {r['us_per_row']:8.2f} us/row  "
                    f"peak RSS {r['peak_rss_mb']:7.0f} MB" + (f"  {r['params']}" if "params" in r else ""),
                    flush=True,
                )
            small, big = results[-2], results[-1]
            print(f"{'':<11} per-row cost x{big['us_per_row'] / max(small['us_per_row'], 1e-9):.2f} at 10x the size")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
