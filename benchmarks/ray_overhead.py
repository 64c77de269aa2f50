"""Ray's overhead against the local engine on one machine: whole process and steady state.

(Not benchmarks/ray.py: a script there would shadow the ray package for every script beside it.)

    python benchmarks/ray_overhead.py data/samples --images 8 --scales 64 --layer pool5   # a quick check
    python benchmarks/ray_overhead.py PHOTOS --images 500 --model vgg16 --repeat 3       # for figures

Each engine runs `featx extract` as the user would, a whole process (the ray engine starts its
own local Ray), on the first N and the first 2N images, into fresh outputs. Whole process: the
seconds of the 2N run. Steady state: N / (t(2N) - t(N)), the rate once start-up (imports, Ray,
actors, the net) is paid. Runs are interleaved and repeated; medians are reported, and the
ratios are of figures measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_isa, cpu_name

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def subset(images: list[Path], root: Path, n: int) -> Path:
    """A folder of the first n images (hard links, or copies across file systems)."""
    folder = root / f"subset-{n}"
    folder.mkdir()
    for i, f in enumerate(images[:n]):
        target = folder / f"{i:06d}{f.suffix.lower()}"
        try:
            os.link(f, target)
        except OSError:
            target.write_bytes(f.read_bytes())
    return folder


def run(engine: str, folder: Path, out: Path, settings: list[str]) -> float:
    cmd = [sys.executable, "-m", "featx", "extract", str(folder), "-o", str(out), "--engine", engine, *settings]
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{engine} failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--images", type=int, default=200, help="N: runs on N and 2N images")
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--layer", default="fc7")
    parser.add_argument("--scales", default="256,384,512")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    images = sorted(f for f in args.folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
    if len(images) < 2 * args.images:
        raise SystemExit(f"{args.folder} holds {len(images)} images; --images {args.images} needs {2 * args.images}")
    settings = ["--model", args.model, "--weights", "random", "--layer", args.layer, "--scales", args.scales]
    settings += ["--precision", args.precision, "--quiet"]
    print(
        f"machine: {cpu_name()} ({cpu_isa()}), {os.cpu_count()} CPUs; "
        f"{args.model} {args.layer} Q={args.scales} precision {args.precision}"
    )

    seconds: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = {n: subset(images, root, n) for n in (args.images, 2 * args.images)}
        for i in range(args.repeat):
            for engine in ("local", "ray"):
                for n, folder in folders.items():
                    out = root / f"{engine}-{n}-{i}" / ("f.parquet" if engine == "local" else "f")
                    out.parent.mkdir()
                    s = run(engine, folder, out, settings)
                    seconds.setdefault((engine, n), []).append(s)
                    print(f"run {i}: {engine:<5} {n:>6} images {s:7.1f} s (load {os.getloadavg()[0]:.2f})", flush=True)

    n = args.images
    summary = {}
    for engine in ("local", "ray"):
        t1, t2 = (statistics.median(seconds[(engine, k)]) for k in (n, 2 * n))
        summary[engine] = {
            "whole_s": t2,
            "whole_img_s": 2 * n / t2,
            "steady_img_s": n / (t2 - t1) if t2 > t1 else float("nan"),
            "startup_s": t1 - (t2 - t1),  # the fixed part: t(N) less N images at the steady rate
        }
    print(f"\n{'engine':<7}{'whole (s)':>11}{'whole img/s':>13}{'steady img/s':>14}{'start-up (s)':>14}")
    for engine, r in summary.items():
        print(
            f"{engine:<7}{r['whole_s']:>11.1f}{r['whole_img_s']:>13.2f}{r['steady_img_s']:>14.2f}{r['startup_s']:>14.1f}"
        )
    lo, ra = summary["local"], summary["ray"]
    print(
        f"ray / local: whole process x{ra['whole_s'] / lo['whole_s']:.2f} the time, "
        f"steady state x{ra['steady_img_s'] / lo['steady_img_s']:.2f} the rate, "
        f"start-up +{ra['startup_s'] - lo['startup_s']:.1f} s"
    )
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": {f"{e} {k}": v for (e, k), v in seconds.items()}}))


if __name__ == "__main__":
    main()
