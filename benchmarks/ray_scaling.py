"""Scaling of `featx extract --engine ray` with the number of model actors, beside the local engine.

    python benchmarks/ray_scaling.py data/samples --actors 1 2 --repeat 3

Each run writes to a fresh folder, so nothing is resumed; wall times include Ray's actor
start-up (a new process that imports torch and builds the net), not Ray's own start. The
configurations are interleaved and repeated, and the median is reported, because a shared
machine's speed drifts while a benchmark runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import featx
from featx.extract.config import DEFAULT_SCALES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--scales", default=",".join(map(str, DEFAULT_SCALES)))
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    # 2 CPU actors need 2 CPUs and the decode tasks one more: Ray's CPUs are logical.
    parser.add_argument("--ray-cpus", type=int, default=(os.cpu_count() or 1) + 1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*randomly initialised VGG.*")
    settings = dict(model=args.model, weights="random", scales=tuple(int(q) for q in args.scales.split(",")))

    import ray

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    configs = [("local", None)] + [("ray", n) for n in args.actors]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    reference = None
    precision = decode_per_image = None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for engine, n in configs:
                out = Path(tmp) / f"{engine}{n or ''}-{i}"
                load = os.getloadavg()[0]  # other work on the machine skews a run: note it
                t = time.perf_counter()
                if engine == "local":
                    r = featx.extract_features(args.folder, out.with_suffix(".parquet"), **settings)
                    precision = featx.read_provenance(r.output)["precision"]  # "auto" resolved
                    decode_per_image = r.stage_seconds["decode"] / max(r.new_rows, 1)
                else:
                    r = featx.extract_features(args.folder, out, engine="ray", actors=n, **settings)
                seconds = time.perf_counter() - t
                got = featx.read_features(r.output).sort_values("path")
                X = np.stack(got["feature"])
                reference = X if reference is None else reference
                runs[(engine, n)].append(
                    {
                        "seconds": seconds,
                        "images": r.new_rows,
                        "load_before": load,
                        "max_abs_diff": float(np.abs(X - reference).max()),
                    }
                )
                print(f"run {i}: {engine} {n or ''} {seconds:.1f} s (load before {load:.2f})", flush=True)
    ray.shutdown()

    summary = []
    for (engine, n), rs in runs.items():
        med = statistics.median(r["seconds"] for r in rs)
        images = rs[0]["images"]
        workers = f"1 process, {torch.get_num_threads()} torch threads" if engine == "local" else f"{n} CPU actor(s)"
        summary.append(
            {
                "engine": engine,
                "workers": workers,
                "images": images,
                "median_seconds": med,
                "seconds": [round(r["seconds"], 1) for r in rs],
                "images_per_second": images / med,
                "max_abs_diff_vs_first_local": max(r["max_abs_diff"] for r in rs),
            }
        )
        print(
            f"{engine:<6} {workers:<28} {images:>3} images  median {med:6.1f} s  {images / med:6.3f} img/s  "
            f"runs {summary[-1]['seconds']}  max|diff| {summary[-1]['max_abs_diff_vs_first_local']:.1e}"
        )
    print(f"precision {precision}; decode {decode_per_image * 1000:.0f} ms of one CPU per image (all scales)")
    if args.json:
        machine = {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "settings": {**settings, "scales": list(settings["scales"]), "precision": precision},
            "decode_seconds_per_image": decode_per_image,
        }
        args.json.write_text(
            json.dumps(
                {"machine": machine, "summary": summary, "runs": {f"{e}{n or ''}": rs for (e, n), rs in runs.items()}},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
