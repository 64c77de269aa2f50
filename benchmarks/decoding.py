"""Decode + rescale throughput of featx's decode stage in one thread, worker threads, and worker
processes, on this machine.

    python benchmarks/decoding.py [FOLDER] [--images 48] [--scales 256,384,512] [--workers 2]

featx decodes in threads beside the model (featx/extract/local.py): Pillow's JPEG decoder and
torchvision's resize release the GIL, and a thread hands the model its tensors without a
copy. Processes must send every rescaled image back through a pipe (~2 MB per image at the
Caltech scales). This prints images/s for each (pools started and warmed before timing: a
run amortises their start-up), best of --rounds. benchmarks/gpu.py prints the same lines.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from machine import cpu_name

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "data" / "samples"


def _one_thread_each() -> None:
    import torch

    torch.set_num_threads(1)


def _decode(args: tuple) -> object:
    from featx.extract.decode import decode

    return decode(*args)


def decode_rates(files: list[Path], scales: tuple[int, ...], workers: int, rounds: int = 2) -> dict[str, float]:
    """Images/s of featx's decode (upright RGB, rescaled to every Q) for: one thread, `workers`
    threads, `workers` processes (spawned, one torch thread each, results pickled back)."""
    import multiprocessing

    from featx.extract.config import DEFAULT_MAX_PIXELS

    jobs = [(f, scales, DEFAULT_MAX_PIXELS) for f in files]
    rates: dict[str, float] = {}

    def best(pool) -> float:
        list(pool.map(_decode, jobs[: 2 * workers]))  # warm-up: imports, first allocations
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            list(pool.map(_decode, jobs))
            times.append(time.perf_counter() - t)
        return len(jobs) / min(times)

    with ThreadPoolExecutor(1) as pool:
        rates["1 thread"] = best(pool)
    with ThreadPoolExecutor(workers) as pool:
        rates[f"{workers} threads"] = best(pool)
    ctx = multiprocessing.get_context("spawn")  # fork after torch's threads started is unsafe
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_thread_each) as pool:
        rates[f"{workers} processes"] = best(pool)
    return rates


def image_files(folder: Path, limit: int) -> list[Path]:
    exts = {".jpg", ".jpeg", ".png"}
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts)
    return files[:limit] if limit else files


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", type=Path, default=SAMPLES)
    p.add_argument("--images", type=int, default=48, help="0 = all")
    p.add_argument("--scales", default="256,384,512")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    files = image_files(args.folder, args.images)
    scales = tuple(int(q) for q in args.scales.split(","))
    print(
        f"decode + rescale to Q={list(scales)} of {len(files)} images from {args.folder}; "
        f"{cpu_name()}, torch {torch.__version__} ({torch.get_num_threads()} threads in this process)"
    )
    for name, rate in decode_rates(files, scales, args.workers, args.rounds).items():
        print(f"  {name:<12} {rate:7.1f} images/s")


if __name__ == "__main__":
    main()
