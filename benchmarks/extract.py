"""How fast `featx extract` is on this machine, next to a naive loop and the machine's peak.

    python benchmarks/extract.py [FOLDER] [--model NAME] [--scales Q,...] [--images N] [--mid M] [--small K]

e.g. `--model resnet50 --scales 224` or `--model convnext_tiny` (the Caltech scales 256,384,512
by default); any backbone of featx extract (VGG16 by default).

One run, on a folder of real images (default: data/samples), measures side by side:
  - featx end to end (featx.extract: decode, resize, model, aggregation, Parquet write) on a
    mid and a large subset: images/s, GFLOP/s (FLOPs of every shape actually run), time per
    stage, peak RSS of the process (flat in the number of images if the two agree), and
    images/s once running (the extra images of the large run over its extra seconds);
  - a naive baseline on a small subset: a per-image torchvision loop (fp32, NCHW, batch 1,
    the same scales and flips: torchvision's own model with its last Linear removed, or VGG
    made dense; a timm model's own forward), and featx's speed-up over it on the same images
    (whole processes, so both pay interpreter start, imports and building the net);
  - this machine's compute peak for the precision in use (a large 3x3 convolution, timed
    before and after the runs), and featx's fraction of it;
  - numerics: per image, the cosine of featx's default descriptor to the exact fp32 one (the
    naive loop's) after centring both by the set's mean exact descriptor (>= 0.995 required);
  - opt-in bucketing (--bucket N): its effect on throughput and on that cosine;
  - other engines, where installed (`pip install -e '.[benchmark]'`; --engines): OpenVINO bf16
    and f32 and ONNX Runtime fp32 on the same images and descriptor (featx's dense net exported
    to ONNX once per settings, kept in --onnx-cache), whole processes, once running, and their
    centred cosines (min, mean) beside featx's own and featx in fp32 (benchmarks/engines.py).
Every run is a fresh subprocess (peak memory is its own). Weights default to random: speed
does not depend on the weights' values (same shapes, same kernels). All figures go to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import engines

REPO = Path(__file__).resolve().parents[1]


# -- children: each measurement runs in its own process --------------------------------------
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def child_featx(job: dict) -> dict:
    import threading

    import featx

    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    t = time.perf_counter()

    def sample() -> None:  # RSS over the run: flat memory shows as a flat second half
        while not stop.wait(1.0):
            samples.append((time.perf_counter() - t, _current_rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = featx.extract_features(job["folder"], job["out"], overwrite=True, **job["settings"])
    seconds = time.perf_counter() - t
    stop.set()
    sampler.join()
    half = [r for s, r in samples if s <= seconds / 2], [r for s, r in samples if s > seconds / 2]
    return {
        "seconds": seconds,
        "rows": result.rows,
        "failures": result.failures,
        "stage_seconds": result.stage_seconds,
        "peak_rss_mb": _rss_mb(),
        "images_per_batch": result.batches.images_per_batch,
        "padding": result.batches.padding,
        "rss_max_first_half_mb": max(half[0], default=None),
        "rss_max_second_half_mb": max(half[1], default=None),
        "rss_timeline": samples[:: max(1, len(samples) // 60)],
    }


def child_naive(job: dict) -> dict:
    """The loop a user would write from torchvision: per image, per scale, per flip, batch 1."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import torchvision.transforms.v2.functional as TF
    from PIL import Image, ImageOps

    from featx.extract.discover import discover
    from featx.net.device import resolve_device
    from featx.net.weights import resolve

    s = job["settings"]
    device = resolve_device(s.get("device", "auto"))
    items = discover([job["folder"]])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    weights = resolve(s["model"], s["weights"], s.get("seed", 0), s["layer"])
    net = naive_net(s["model"], s["layer"], weights).to(device).eval()  # fp32, NCHW: x -> [1, C]
    setup = time.perf_counter() - t
    rows = []
    with torch.inference_mode():
        for item in items:
            image = TF.pil_to_tensor(ImageOps.exif_transpose(Image.open(item.file)).convert("RGB"))
            per_scale = []
            for q in s["scales"]:
                x = TF.resize(image, [q], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
                x = TF.normalize(x.float() / 255, list(weights.mean), list(weights.std))[None].to(device)
                d = net(x)[0]
                if s["flip"]:
                    d = (d + net(x.flip(-1))[0]) / 2
                per_scale.append(d)
            d = torch.stack(per_scale).mean(0) if s["aggregate"] == "mean" else torch.cat(per_scale)
            rows.append(F.normalize(d, dim=0).cpu().numpy())
    sync()
    seconds = time.perf_counter() - t
    np.save(job["out"], np.stack(rows))
    return {
        "seconds": seconds,
        "setup_seconds": setup,
        "rows": len(rows),
        "paths": [it.path for it in items],
        "peak_rss_mb": _rss_mb(),
    }


def naive_net(model: str, layer: str, weights):
    """What a user would run per image: x [1, 3, h, w] -> the descriptor before L2, [1, C].

    torchvision's convnets at their default tap: torchvision's own model with the classifier's
    last Linear made an Identity (its global pool is the mean over positions); a timm convnet:
    forward_features then forward_head(pre_logits=True); VGG, a ViT or another tap: featx's own
    reference forward (forward_pooled), one image at a time.
    """
    from torch import nn

    from featx.net.backbones import get_backbone

    backbone = get_backbone(model)
    layer = backbone.layer(layer)
    if backbone.family not in ("vgg", "timm") and layer == backbone.default_tap:
        tv = backbone.torchvision_model(weights)
        last = {"resnet": "fc", "regnet": "fc", "densenet": "classifier"}.get(backbone.family)
        if last:
            setattr(tv, last, nn.Identity())
        else:  # convnext, efficientnet, mobilenet: the classifier's last Linear
            tv.classifier[-1] = nn.Identity()
        return tv
    net = backbone.build(weights, layer)

    class Alone(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.forward_pooled(x)

    return Alone()


def run_child(kind: str, job: dict) -> dict:
    """Run one measurement in a fresh interpreter; `process_seconds` is its whole life (start,
    imports, net build, run, write), the same clock for featx and the naive loop."""
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(job)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    process_seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"process_seconds": process_seconds}


# -- the machine's peak --------------------------------------------------------------------
def conv_peak(precision: str, device_name: str, seconds: float = 3.0) -> dict:
    """GFLOP/s of a large 3x3 conv (256->256, 2x96x128, channels-last) in `precision`: best of runs."""
    import torch
    import torch.nn.functional as F

    from featx.net.device import resolve_device, torch_dtype
    from featx.net.plan import onednn_prepack_works

    device = resolve_device(device_name)
    dtype = torch_dtype(precision)
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
            x, pw, b, [1, 1], [1, 1], [1, 1], 1, "none", [], ""
        )
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
def run_flops(table, flops_of, scales, flip: bool, bucket: int) -> tuple[int, int]:
    """FLOPs of every (image, scale) shape run, and the number of distinct shapes."""
    from featx.extract.decode import scaled_size

    total, shapes = 0, set()
    for w, h in zip(table["width"], table["height"]):
        for q in scales:
            sh, sw = scaled_size(int(w), int(h), q, bucket)
            shapes.add((sh, sw))
            total += flops_of(sh, sw) * (2 if flip else 1)
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
    from machine import cpu_flags, cpu_isa, cpu_name

    flags = cpu_flags()
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": cpu_isa(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "onednn": torch.backends.mkldnn.is_available(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("folder", nargs="?", default=str(REPO / "data" / "samples"))
    p.add_argument("--images", type=int, default=0, help="large set: this many images (0 = all)")
    p.add_argument("--mid", type=int, default=0, help="the second size for flat memory (default: half the large set)")
    p.add_argument("--small", type=int, default=0, help="the naive baseline's images (default: a quarter, 4..12)")
    p.add_argument("--model", default="vgg16", help="any backbone of featx extract (resnet50, convnext_tiny, ...)")
    p.add_argument(
        "--weights", default="random", help="random (default: speed does not depend on it), default, or a file"
    )
    p.add_argument("--layer", default="default", help="the tap (default: the model's default: fc7, pre_logits)")
    p.add_argument("--scales", default="256,384,512")
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--aggregate", default="mean")
    p.add_argument("--precision", default="auto", help="featx's precision (default: featx's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32, help="featx's --batch-size (its default: 32)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--bucket", type=int, default=0, help="grid step of an INEXACT bucketing run for comparison (0 = skip)"
    )
    p.add_argument("--rounds", type=int, default=2, help="naive and featx on the small set, alternately; best counts")
    p.add_argument(
        "--engines", default="auto", help="other engines on the small set: auto (those installed), none, or a list"
    )
    p.add_argument(
        "--onnx-cache", default=None, help="where the engines' ONNX export is kept (default: the temp folder)"
    )
    p.add_argument("--fp32", action="store_true", help="featx in fp32 beside its default precision (on with engines)")
    p.add_argument("--json", default="bench-extract.json", help="where to write every figure")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        kind, job = args.child[0], json.loads(args.child[1])
        print(json.dumps({"featx": child_featx, "naive": child_naive, "engine": engines.child}[kind](job)))
        return 0
    engine_names = engines.available(args.engines)

    from functools import cache

    import numpy as np
    import pyarrow.parquet as pq

    from featx.extract.config import ExtractConfig
    from featx.extract.discover import discover
    from featx.net.backbones import get_backbone
    from featx.net.device import resolve_device, resolve_precision, torch_dtype

    scales = tuple(int(q) for q in args.scales.split(","))
    flip = not args.no_flip
    settings = dict(
        model=args.model,
        weights=args.weights,
        layer=args.layer,
        scales=scales,
        flip=flip,
        aggregate=args.aggregate,
        precision=args.precision,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    config = ExtractConfig(**settings)
    settings["layer"] = config.layer  # the default tap, by name
    backbone = get_backbone(config.model)
    precision = resolve_precision(config.precision, config.device)
    items = discover([args.folder])
    large = subset(items, args.images or len(items))
    mid = subset(large, args.mid or max(1, len(large) // 2))
    small = subset(large, args.small or min(12, max(4, len(large) // 4)))
    # FLOPs per input shape from featx's layer table (on the meta device: shapes only).
    flops_of = cache(lambda h, w: backbone.summary(h, w, config.layer)["flops"])
    report: dict = {
        "machine": machine(),
        "folder": str(args.folder),
        "settings": config.to_dict() | {"precision_resolved": precision, "scales": list(scales)},
        "load_average_start": os.getloadavg(),
        "conv_kernels": backbone.kernels(resolve_device(config.device), torch_dtype(precision)),
        "winograd": backbone.family == "vgg",
    }
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    with tempfile.TemporaryDirectory(prefix="featx-bench-") as tmp:
        tmp = Path(tmp)
        folders = {
            name: link_folder(tmp / name, its) for name, its in (("small", small), ("mid", mid), ("large", large))
        }
        jsonable = settings | {"scales": list(scales)}

        def featx_run(name: str, tag: str = "", **extra) -> dict:
            out = tmp / f"{name}{tag}.parquet"
            run = run_child("featx", {"folder": str(folders[name]), "out": str(out), "settings": jsonable | extra})
            return run | {"parquet": str(out)}

        log(f"peak: a large 3x3 convolution in {precision} ...")
        peaks = [conv_peak(precision, args.device)]
        naive_runs, fast_runs, fp32_runs = [], [], []
        # featx in fp32 beside its bf16 (the engines' side by side), where its default is not fp32.
        with_fp32 = precision != "fp32" and (engine_names or args.fp32)
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}: naive loop on {len(small)} images (fp32, NCHW, batch 1) ...")
            naive_runs.append(
                run_child(
                    "naive",
                    {
                        "folder": str(folders["small"]),
                        "out": str(tmp / "naive.npy"),
                        "settings": jsonable | {"seed": 0},
                    },
                )
            )
            log(f"round {r + 1}/{args.rounds}: featx on the same {len(small)} images ...")
            fast_runs.append(featx_run("small"))
            if with_fp32:
                log(f"round {r + 1}/{args.rounds}: featx in fp32 on the same {len(small)} images ...")
                fp32_runs.append(featx_run("small", "-fp32", precision="fp32"))
        exact_small = dict(zip(naive_runs[-1]["paths"], np.load(tmp / "naive.npy")))
        others = engines.measure(
            engine_names, folders["small"], jsonable | {"seed": 0}, tmp, exact_small, run_child, centred_cosines,
            args.rounds, log, args.onnx_cache,
        )  # fmt: skip
        bucketed = None
        if args.bucket:
            log(f"featx --bucket {args.bucket} on the {len(small)} images ...")
            bucketed = featx_run("small", "-bucket", bucket=args.bucket)
        log(f"featx on {len(mid)} images ...")
        fast_mid = featx_run("mid")
        log(f"featx on {len(large)} images ...")
        fast_large = featx_run("large")
        peaks.append(conv_peak(precision, args.device))
        report["load_average_end"] = os.getloadavg()

        def figures(run: dict, bucket: int = 0) -> dict:
            table = pq.read_table(run["parquet"], columns=["path", "width", "height"]).to_pydict()
            flops, shapes = run_flops(table, flops_of, scales, flip, bucket)
            # Setup: building and packing the net (and anything else outside the stages).
            setup = run["seconds"] - sum(v for k, v in run["stage_seconds"].items() if k != "decode")
            return run | {
                "images": run["rows"],
                "images_per_s": run["rows"] / run["seconds"],
                "setup_seconds": setup,
                "images_per_s_running": run["rows"] / (run["seconds"] - setup),
                "gflop": flops / 1e9,
                "gflops": flops / run["seconds"] / 1e9,
                "model_gflops": flops / max(run["stage_seconds"]["model"], 1e-9) / 1e9,
                "distinct_shapes": shapes,
            }

        naive = min(naive_runs, key=lambda x: x["process_seconds"])
        fs = figures(min(fast_runs, key=lambda x: x["process_seconds"]))
        fm, fl = figures(fast_mid), figures(fast_large)
        naive |= {
            "images_per_s": naive["rows"] / naive["seconds"],
            "gflop": fs["gflop"],
            "gflops": fs["gflop"] / naive["seconds"],
            "images_per_s_running": naive["rows"] / (naive["seconds"] - naive["setup_seconds"]),
        }
        exact = dict(zip(naive.pop("paths"), np.load(tmp / "naive.npy")))

        def cosines(parquet: str) -> dict:
            df = pq.read_table(parquet, columns=["path", "feature"]).to_pydict()
            fast = np.stack([np.asarray(f, dtype=np.float64) for f in df["feature"]])
            ref = np.stack([exact[p] for p in df["path"]]).astype(np.float64)
            c = centred_cosines(fast, ref)
            raw = (fast * ref).sum(1) / (np.linalg.norm(fast, axis=1) * np.linalg.norm(ref, axis=1))
            return {
                "images": len(c),
                "centred_min": float(c.min()),
                "centred_mean": float(c.mean()),
                "centred_median": float(np.median(c)),
                "raw_min": float(raw.min()),
                "max_abs_diff": float(np.abs(fast - ref).max()),
                "ok": bool(c.min() >= 0.995),
            }

        peak = max(peaks, key=lambda x: x["gflops"])
        steady = None
        if fl["images"] > fm["images"] and fl["seconds"] > fm["seconds"]:
            extra_flops = (fl["gflop"] - fm["gflop"]) / (fl["seconds"] - fm["seconds"])
            steady = {
                "images_per_s": (fl["images"] - fm["images"]) / (fl["seconds"] - fm["seconds"]),
                "gflops": extra_flops,
            }
        report |= {
            "peak": {"gflops": peak["gflops"], "runs": peaks},
            "naive": naive | {"all_seconds": [r["seconds"] for r in naive_runs]},
            "featx_small": fs | {"all_seconds": [r["seconds"] for r in fast_runs]},
            "featx_mid": fm,
            "featx_large": fl,
            # Once running: the large run's extra images over its extra seconds (setup cancels).
            "featx_steady": steady,
            # Whole processes on both sides: featx's in-process clock starts before `import torch`
            # (featx imports it lazily), the naive loop's after; process_seconds treats both alike.
            "speedup_same_images": naive["process_seconds"] / fs["process_seconds"],
            "speedup_same_images_running": fs["images_per_s_running"] / naive["images_per_s_running"],
            "speedup_steady": steady["images_per_s"] / naive["images_per_s_running"] if steady else None,
            "fraction_of_peak": fl["gflops"] / peak["gflops"],
            "memory_flat": {
                "mid_images": fm["images"],
                "mid_mb": fm["peak_rss_mb"],
                "large_images": fl["images"],
                "large_mb": fl["peak_rss_mb"],
                "large_first_half_mb": fl["rss_max_first_half_mb"],
                "large_second_half_mb": fl["rss_max_second_half_mb"],
            },
            "numerics": {"precision": precision, **cosines(fs["parquet"])},
            "engines": others,
        }
        if fp32_runs:
            f32 = figures(min(fp32_runs, key=lambda x: x["process_seconds"]))
            report["featx_small_fp32"] = f32 | {
                "all_seconds": [r["seconds"] for r in fp32_runs],
                "numerics": {"precision": "fp32", **cosines(f32["parquet"])},
            }
            report["featx_small_fp32"].pop("parquet")
        if bucketed:
            fb = figures(bucketed, args.bucket)
            report["bucket"] = fb | {
                "grid": args.bucket,
                "numerics": cosines(fb["parquet"]),
                "speedup_vs_exact_shapes": fb["images_per_s"] / fs["images_per_s"],
            }
        for run in ("featx_small", "featx_mid", "featx_large"):
            report[run].pop("parquet")
        if bucketed:
            report["bucket"].pop("parquet")

    Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")
    print_report(report)
    print(f"all figures: {args.json}")
    return 0


def print_report(r: dict) -> None:
    s, fl, fm, fs, nv = r["settings"], r["featx_large"], r["featx_mid"], r["featx_small"], r["naive"]
    flip = "with flips" if s["flip"] else "no flips"
    print(
        f"\nfeatx benchmark: {s['model']}, Q={s['scales']} {flip}, {s['layer']}, precision {s['precision_resolved']}"
        f" ({s['precision']}), weights {s['weights']}"
    )
    m = r["machine"]
    print(
        f"machine: {m['cpu']} ({m.get('isa', 'ISA not recorded')}), {m['cores']} cores, "
        f"torch {m['torch']} ({m['torch_threads']} threads); "
        f"load average {r['load_average_start'][0]:.1f} -> {r['load_average_end'][0]:.1f}"
    )
    if r.get("conv_kernels"):
        print(f"convolutions: {r['conv_kernels']}")
    print(f"{'run':<36}{'images':>7}{'img/s':>9}{'GFLOP/s':>9}{'peak RSS MB':>13}")
    rows = [
        ("naive loop (fp32, NCHW, batch 1)", nv),
        ("featx, same images", fs),
        ("featx, mid set", fm),
        ("featx, large set", fl),
    ]
    if "bucket" in r:
        rows.append((f"featx --bucket {r['bucket']['grid']}, same images", r["bucket"]))
    for name, x in rows:
        print(f"{name:<36}{x['rows']:>7}{x['images_per_s']:>9.3f}{x['gflops']:>9.0f}{x['peak_rss_mb']:>13.0f}")
    st = r["featx_steady"]
    if st:
        print(f"{'featx once running (large - mid)':<36}{'':>7}{st['images_per_s']:>9.3f}{st['gflops']:>9.0f}")
    print(
        f"speed-up over naive on the same images: {r['speedup_same_images']:.2f}x end to end (whole processes: "
        f"naive {nv['process_seconds']:.1f} s, featx {fs['process_seconds']:.1f} s), "
        f"{r['speedup_same_images_running']:.2f}x without building the net (featx {fs['setup_seconds']:.1f} s, "
        f"naive {nv['setup_seconds']:.1f} s); large - mid run vs naive: "
        + (f"{r['speedup_steady']:.2f}x" if st else "n/a")
    )
    pk = r["peak"]["gflops"]
    print(
        f"peak ({r['peak']['runs'][0]['dtype']} direct 3x3 conv): {pk:.0f} GFLOP/s; "
        f"featx end to end {fl['gflops']:.0f} "
        f"GFLOP/s = {100 * r['fraction_of_peak']:.0f}% of peak (model stage {fl['model_gflops']:.0f} = "
        f"{100 * fl['model_gflops'] / pk:.0f}%" + (f"; once running {100 * st['gflops'] / pk:.0f}%)" if st else ")")
    )
    if r.get("winograd", True):
        print(
            "  (featx's GFLOP/s count a direct convolution's FLOPs; its Winograd layers do 2.25x (bf16) or 4x (fp32) "
            "fewer multiplications, so the model stage can pass the direct kernel's peak)"
        )
    print(
        f"batches (large set): {fl.get('images_per_batch', 0):.1f} images per batch, "
        f"{100 * fl.get('padding', 0):.0f}% padding (exact mixed-size batches)"
    )
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in fl["stage_seconds"].items())
    print(f"stages (large set, {fl['seconds']:.1f} s wall; decode runs in threads beside the model): {parts}")
    mf = r["memory_flat"]
    halves = (
        f"; RSS during the large run: max {mf['large_first_half_mb']:.0f} MB in its first half, "
        f"{mf['large_second_half_mb']:.0f} MB in its second"
        if mf["large_second_half_mb"]
        else ""
    )
    print(
        f"peak memory: {mf['mid_mb']:.0f} MB at {mf['mid_images']} images, {mf['large_mb']:.0f} MB at "
        f"{mf['large_images']}{halves}"
    )
    nm = r["numerics"]
    print(
        f"numerics ({nm['precision']} vs exact fp32, {nm['images']} images, centred cosine): "
        f"min {nm['centred_min']:.5f}, "
        f"median {nm['centred_median']:.5f} -> {'OK' if nm['ok'] else 'BELOW 0.995'} (raw min {nm['raw_min']:.5f})"
    )
    engines.print_rows(r)
    if "bucket" in r:
        b = r["bucket"]
        print(
            f"bucket {b['grid']}: {b['distinct_shapes']} distinct shapes (exact: {fs['distinct_shapes']}), "
            f"{b['speedup_vs_exact_shapes']:.2f}x exact-shape speed, centred cosine min "
            f"{b['numerics']['centred_min']:.4f} median {b['numerics']['centred_median']:.4f}"
        )


if __name__ == "__main__":
    sys.exit(main())
