"""Scaling of `featx extract --engine ray` with the number of model actors, beside the local engine.

    python benchmarks/ray_scaling.py data/samples --actors 1 2

Each run writes to a fresh folder, so nothing is resumed; wall times include Ray's actor
start-up (a new process that imports torch and builds the net), not Ray's own start.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import featx
from featx.config import DEFAULT_SCALES
from featx.ray_engine import extract_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--scales", default=",".join(map(str, DEFAULT_SCALES)))
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    # 2 CPU actors need 2 CPUs and the decode tasks one more: Ray's CPUs are logical.
    parser.add_argument("--ray-cpus", type=int, default=(os.cpu_count() or 1) + 1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*randomly initialised VGG.*")
    settings = dict(model=args.model, weights="random", scales=tuple(int(q) for q in args.scales.split(",")))

    import ray

    load_before = os.getloadavg()[0]
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        local = featx.extract(args.folder, Path(tmp) / "local.parquet", **settings)
        results.append({"engine": "local", "workers": "torch threads: %d" % __import__("torch").get_num_threads(),
                        "images": local.new_rows, "seconds": time.perf_counter() - t,
                        "decode_cpu_seconds_per_image": local.stage_seconds["decode"] / max(local.new_rows, 1)})
        reference = featx.read_features(local.output).sort_values("path")
        precision = featx.read_provenance(local.output)["precision"]  # "auto" resolved
        for n in args.actors:
            t = time.perf_counter()
            r = extract_ray(args.folder, Path(tmp) / f"ray{n}", actors=n, **settings)
            seconds = time.perf_counter() - t
            got = featx.read_features(r.output).sort_values("path")
            diff = float(np.abs(np.stack(got["feature"]) - np.stack(reference["feature"])).max())
            results.append({"engine": "ray", "workers": f"{n} CPU actor(s)", "images": r.new_rows,
                            "seconds": seconds, "max_abs_diff_vs_local": diff})
    ray.shutdown()
    # Other work on the machine skews the figure: the 1-minute load average says if there was any.
    print(f"load average (1 min) before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f}")
    for r in results:
        r["images_per_second"] = r["images"] / r["seconds"]
        print(f"{r['engine']:<6} {r['workers']:<18} {r['images']:>4} images {r['seconds']:8.1f} s "
              f"{r['images_per_second']:6.3f} img/s" + (f"  max|diff| {r['max_abs_diff_vs_local']:.1e}" if "max_abs_diff_vs_local" in r else ""))
    if args.json:
        machine = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                   "settings": {**settings, "scales": list(settings["scales"]), "precision": precision}}
        machine["load_average_before"] = load_before
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
