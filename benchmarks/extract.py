"""How fast `featx extract` is on this machine, next to a naive loop and the machine's peak.

    python benchmarks/extract.py [FOLDER] [--images N] [--small K] [--json FILE]

One run, on a folder of real images (default: data/samples), measures side by side:
  - featx end to end (featx.extract: decode, resize, model, aggregation, Parquet write) on a
    small and a large subset: images/s, GFLOP/s (FLOPs of every shape actually run), time per
    stage, peak RSS of the process (flat in the number of images if the two agree);
  - a naive baseline on the small subset: a per-image torchvision loop (fp32, NCHW, batch 1,
    the same scales and flips), and featx's speed-up over it on the same images;
  - this machine's compute peak for the precision in use (a large 3x3 convolution, timed
    before and after the runs), and featx's fraction of it;
  - numerics: per image, the cosine of featx's default descriptor to the exact fp32 one (the
    naive loop's) after centring both by the set's mean exact descriptor (>= 0.995 required);
  - opt-in bucketing (--bucket N): its effect on throughput and on that cosine.
Every run is a fresh subprocess (peak memory is its own). Weights default to random: speed
does not depend on the weights' values (same shapes, same kernels). All figures go to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# -- children: each measurement runs in its own process --------------------------------------
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_featx(job: dict) -> dict:
    import featx

    t = time.perf_counter()
    result = featx.extract(job["folder"], job["out"], overwrite=True, **job["settings"])
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "rows": result.rows, "failures": result.failures,
            "stage_seconds": result.stage_seconds, "peak_rss_mb": _rss_mb()}


def child_naive(job: dict) -> dict:
    """The loop a user would write from torchvision: per image, per scale, per flip, batch 1."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import torchvision.transforms.v2.functional as TF
    from PIL import Image, ImageOps

    from featx.descriptor import resolve_device
    from featx.discover import discover
    from featx.model import build
    from featx.weights import resolve

    s = job["settings"]
    device = resolve_device(s.get("device", "auto"))
    items = discover([job["folder"]])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    weights = resolve(s["model"], s["weights"], s.get("seed", 0), s["layer"])
    net = build(s["model"], weights, s["layer"]).to(device).eval()  # fp32, NCHW
    rows = []
    with torch.inference_mode():
        for item in items:
            image = TF.pil_to_tensor(ImageOps.exif_transpose(Image.open(item.file)).convert("RGB"))
            per_scale = []
            for q in s["scales"]:
                x = TF.resize(image, [q], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
                x = TF.normalize(x.float() / 255, list(weights.mean), list(weights.std))[None].to(device)
                d = net(x).mean(dim=(2, 3))[0]
                if s["flip"]:
                    d = (d + net(x.flip(-1)).mean(dim=(2, 3))[0]) / 2
                per_scale.append(d)
            d = torch.stack(per_scale).mean(0) if s["aggregate"] == "mean" else torch.cat(per_scale)
            rows.append(F.normalize(d, dim=0).cpu().numpy())
    sync()
    seconds = time.perf_counter() - t
    np.save(job["out"], np.stack(rows))
    return {"seconds": seconds, "rows": len(rows), "paths": [it.path for it in items], "peak_rss_mb": _rss_mb()}


def run_child(kind: str, job: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(job)],
        capture_output=True, text=True, cwd=REPO,
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the machine's peak --------------------------------------------------------------------
def conv_peak(precision: str, device_name: str, seconds: float = 3.0) -> dict:
    """GFLOP/s of a large 3x3 conv (256->256, 2x96x128, channels-last) in `precision`: best of runs."""
    import torch
    import torch.nn.functional as F

    from featx.accel import onednn_prepack_works
    from featx.descriptor import DTYPES, resolve_device

    device = resolve_device(device_name)
    dtype = DTYPES[precision]
    n, c, h, w = 2, 256, 96, 128
    flops = 2 * c * c * 9 * h * w * n
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(c, c, 3, 3, generator=gen) * 0.05).to(device, dtype).contiguous(memory_format=torch.channels_last)
    b = torch.zeros(c, device=device, dtype=dtype)
    kernels = {"F.conv2d": lambda: F.conv2d(x, wt, b, padding=1)}
    if device.type == "cpu" and onednn_prepack_works(dtype):
        pw = torch.ops.mkldnn._reorder_convolution_weight(wt, [1, 1], [1, 1], [1, 1], 1, [n, c, h, w])
        kernels["oneDNN prepacked"] = lambda: torch.ops.mkldnn._convolution_pointwise(
            x, pw, b, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = {}
    with torch.inference_mode():
        for name, fn in kernels.items():
            fn(), sync()
            times, start = [], time.perf_counter()
            while time.perf_counter() - start < seconds / len(kernels):
                t = time.perf_counter()
                fn(), sync()
                times.append(time.perf_counter() - t)
            best[name] = flops / min(times) / 1e9
    return {"gflops": max(best.values()), "by_kernel": best, "shape": [n, c, h, w], "dtype": precision}


# -- figures -------------------------------------------------------------------------------
def run_flops(table, net, scales, flip: bool, bucket: int) -> tuple[int, int]:
    """FLOPs of every (image, scale) shape run, and the number of distinct shapes."""
    from featx.decode import scaled_size

    total, shapes = 0, set()
    for w, h in zip(table["width"], table["height"]):
        for q in scales:
            sh, sw = scaled_size(int(w), int(h), q, bucket)
            shapes.add((sh, sw))
            total += net.flops(sh, sw) * (2 if flip else 1)
    return total, len(shapes)


def centred_cosines(fast, exact):
    """Per row: cosine of (fast - m) and (exact - m), m = the mean exact descriptor."""
    import numpy as np

    m = exact.mean(axis=0, keepdims=True)
    a, b = fast - m, exact - m
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def subset(items, k: int) -> list:
    """k items spread evenly over the sorted list (every class, not just the first)."""
    if k >= len(items):
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


def link_folder(root: Path, items) -> Path:
    root.mkdir(parents=True)
    for it in items:
        dst = root / it.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(it.file)
    return root


def machine() -> dict:
    import torch

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "onednn": torch.backends.mkldnn.is_available(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default=str(REPO / "data" / "samples"))
    p.add_argument("--images", type=int, default=0, help="large set: this many images (0 = all)")
    p.add_argument("--small", type=int, default=0, help="small set (also the naive baseline's); default: a quarter, 4..16")
    p.add_argument("--model", default="vgg16")
    p.add_argument("--weights", default="random", help="random (default: speed does not depend on it), default, or a file")
    p.add_argument("--layer", default="fc7")
    p.add_argument("--scales", default="256,384,512")
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--aggregate", default="mean")
    p.add_argument("--precision", default="auto", help="featx's precision (default: featx's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--bucket", type=int, default=32, help="grid step of the opt-in bucketing run (0 = skip)")
    p.add_argument("--rounds", type=int, default=1, help="repeat naive and featx-small alternately; best counts")
    p.add_argument("--json", default="bench-extract.json", help="where to write every figure")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        kind, job = args.child[0], json.loads(args.child[1])
        print(json.dumps({"featx": child_featx, "naive": child_naive}[kind](job)))
        return 0

    import numpy as np
    import pyarrow.parquet as pq

    from featx.config import ExtractConfig, resolved_precision
    from featx.discover import discover
    from featx.model import build
    from featx.weights import Weights

    scales = tuple(int(q) for q in args.scales.split(","))
    flip = not args.no_flip
    settings = dict(model=args.model, weights=args.weights, layer=args.layer, scales=scales, flip=flip,
                    aggregate=args.aggregate, precision=args.precision, device=args.device,
                    batch_size=args.batch_size, workers=args.workers)
    config = ExtractConfig(**settings)
    precision = resolved_precision(config)
    items = discover([args.folder])
    large = subset(items, args.images or len(items))
    small = subset(large, args.small or min(16, max(4, len(large) // 4)))
    net = build(args.model, Weights({"kind": "random", "seed": 0}, None), args.layer)
    report: dict = {
        "machine": machine(), "folder": str(args.folder),
        "settings": config.to_dict() | {"precision_resolved": precision, "scales": list(scales)},
        "load_average_start": os.getloadavg(),
    }
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    with tempfile.TemporaryDirectory(prefix="featx-bench-") as tmp:
        tmp = Path(tmp)
        small_dir, large_dir = link_folder(tmp / "small", small), link_folder(tmp / "large", large)
        jsonable = settings | {"scales": list(scales)}
        log(f"peak: a large 3x3 convolution in {precision} ...")
        peaks = [conv_peak(precision, args.device)]

        naive_runs, fast_runs = [], []
        for r in range(args.rounds):
            log(f"naive loop on {len(small)} images (fp32, NCHW, batch 1), round {r + 1} ...")
            naive_runs.append(run_child("naive", {"folder": str(small_dir), "out": str(tmp / "naive.npy"),
                                                  "settings": jsonable | {"seed": 0}}))
            log(f"featx on the same {len(small)} images ...")
            fast_runs.append(run_child("featx", {"folder": str(small_dir), "out": str(tmp / "small.parquet"),
                                                 "settings": jsonable}))
        naive = min(naive_runs, key=lambda x: x["seconds"])
        fast_small = min(fast_runs, key=lambda x: x["seconds"])
        bucketed = None
        if args.bucket:
            log(f"featx --bucket {args.bucket} on the {len(small)} images ...")
            bucketed = run_child("featx", {"folder": str(small_dir), "out": str(tmp / "bucket.parquet"),
                                           "settings": jsonable | {"bucket": args.bucket}})
        log(f"featx on {len(large)} images ...")
        fast_large = run_child("featx", {"folder": str(large_dir), "out": str(tmp / "large.parquet"),
                                         "settings": jsonable})
        peaks.append(conv_peak(precision, args.device))
        report["load_average_end"] = os.getloadavg()

        def figures(run: dict, parquet: Path, bucket: int = 0) -> dict:
            table = pq.read_table(parquet, columns=["path", "width", "height"]).to_pydict()
            flops, shapes = run_flops(table, net, scales, flip, bucket)
            return run | {"images": run["rows"], "images_per_s": run["rows"] / run["seconds"],
                          "gflop": flops / 1e9, "gflops": flops / run["seconds"] / 1e9,
                          "model_gflops": flops / max(run["stage_seconds"]["model"], 1e-9) / 1e9,
                          "distinct_shapes": shapes}

        fs, fl = figures(fast_small, tmp / "small.parquet"), figures(fast_large, tmp / "large.parquet")
        naive_flops, _ = run_flops(pq.read_table(tmp / "small.parquet", columns=["width", "height"]).to_pydict(),
                                   net, scales, flip, 0)
        naive |= {"images_per_s": naive["rows"] / naive["seconds"], "gflops": naive_flops / naive["seconds"] / 1e9}
        exact = dict(zip(naive.pop("paths"), np.load(tmp / "naive.npy")))

        def cosines(parquet: Path) -> dict:
            df = pq.read_table(parquet, columns=["path", "feature"]).to_pydict()
            fast = np.stack([np.asarray(f, dtype=np.float64) for f in df["feature"]])
            ref = np.stack([exact[p] for p in df["path"]]).astype(np.float64)
            c = centred_cosines(fast, ref)
            raw = (fast * ref).sum(1) / (np.linalg.norm(fast, axis=1) * np.linalg.norm(ref, axis=1))
            return {"centred_min": float(c.min()), "centred_median": float(np.median(c)),
                    "raw_min": float(raw.min()), "max_abs_diff": float(np.abs(fast - ref).max()),
                    "ok": bool(c.min() >= 0.995)}

        peak = max(peaks, key=lambda x: x["gflops"])
        report |= {
            "peak": {"gflops": peak["gflops"], "runs": peaks},
            "naive": naive | {"all_seconds": [r["seconds"] for r in naive_runs]},
            "featx_small": fs | {"all_seconds": [r["seconds"] for r in fast_runs]},
            "featx_large": fl,
            "speedup_same_images": fs["images_per_s"] / naive["images_per_s"],
            "speedup_gflops_large": fl["gflops"] / naive["gflops"],
            "fraction_of_peak": fl["gflops"] / peak["gflops"],
            "memory_flat": {"small_images": fs["images"], "small_mb": fs["peak_rss_mb"],
                            "large_images": fl["images"], "large_mb": fl["peak_rss_mb"]},
            "numerics": {"precision": precision, **cosines(tmp / "small.parquet")},
        }
        if bucketed:
            fb = figures(bucketed, tmp / "bucket.parquet", args.bucket)
            report["bucket"] = fb | {"grid": args.bucket, "numerics": cosines(tmp / "bucket.parquet"),
                                     "speedup_vs_exact_shapes": fb["images_per_s"] / fs["images_per_s"]}

    Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")
    print_report(report)
    print(f"all figures: {args.json}")
    return 0


def print_report(r: dict) -> None:
    s, fl, fs, nv = r["settings"], r["featx_large"], r["featx_small"], r["naive"]
    flip = "with flips" if s["flip"] else "no flips"
    print(f"\nfeatx benchmark: {s['model']}, Q={s['scales']} {flip}, {s['layer']}, precision {s['precision_resolved']}"
          f" ({s['precision']}), weights {s['weights']}")
    m = r["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); "
          f"load average {r['load_average_start'][0]:.1f} -> {r['load_average_end'][0]:.1f}")
    print(f"{'run':<34}{'images':>7}{'img/s':>9}{'GFLOP/s':>9}{'peak RSS MB':>13}")
    rows = [(f"naive loop (fp32, NCHW, batch 1)", nv), ("featx, same images", fs), ("featx, large set", fl)]
    if "bucket" in r:
        rows.append((f"featx --bucket {r['bucket']['grid']}, same images", r["bucket"]))
    for name, x in rows:
        print(f"{name:<34}{x['rows']:>7}{x['images_per_s']:>9.3f}{x['gflops']:>9.0f}{x['peak_rss_mb']:>13.0f}")
    print(f"speed-up over naive: {r['speedup_same_images']:.2f}x on the same images (end to end), "
          f"{r['speedup_gflops_large']:.2f}x in GFLOP/s (large set)")
    print(f"peak ({r['peak']['runs'][0]['dtype']} 3x3 conv): {r['peak']['gflops']:.0f} GFLOP/s; featx end to end "
          f"{fl['gflops']:.0f} GFLOP/s = {100 * r['fraction_of_peak']:.0f}% of peak (model stage alone "
          f"{fl['model_gflops']:.0f} = {100 * fl['model_gflops'] / r['peak']['gflops']:.0f}%)")
    st = fl["stage_seconds"]
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in st.items())
    print(f"stages (large set, {fl['seconds']:.1f} s wall; decode runs in threads beside the model): {parts}")
    mf = r["memory_flat"]
    print(f"peak memory: {mf['small_mb']:.0f} MB at {mf['small_images']} images, {mf['large_mb']:.0f} MB at {mf['large_images']}")
    nm = r["numerics"]
    print(f"numerics ({nm['precision']} vs exact fp32, centred cosine per image): min {nm['centred_min']:.5f}, "
          f"median {nm['centred_median']:.5f} -> {'OK' if nm['ok'] else 'BELOW 0.995'} (raw min {nm['raw_min']:.5f})")
    if "bucket" in r:
        b = r["bucket"]
        print(f"bucket {b['grid']}: {b['distinct_shapes']} distinct shapes (exact: {fs['distinct_shapes']}), "
              f"{b['speedup_vs_exact_shapes']:.2f}x exact-shape speed, centred cosine min "
              f"{b['numerics']['centred_min']:.4f} median {b['numerics']['centred_median']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
