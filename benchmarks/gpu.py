"""featx on a GPU: images/s and TFLOP/s against the device's measured matmul peak.

    python benchmarks/gpu.py [FOLDER] [--device cuda] [--weights random] [--json FILE]
    python benchmarks/gpu.py --device cpu --quick      # smoke mode (tests run it)

On a folder of real JPEGs (default: data/samples), in one process, it prints:
  - the device, the CPU, torch, and the measured matmul peak for the precision in use
    (bf16 on GPUs; a large square matmul, best of runs);
  - decode alone: images/s of featx's decode + resize to every Q in 1 thread, N threads (what
    featx runs) and N processes (benchmarks/decoding.py), to show whether the CPU can feed the device;
  - the paper's Caltech descriptor (VGG16, Q=256,384,512, flip): end to end through
    `featx.extract_features` (decode workers, mixed batches, Parquet write) with the time per
    stage (decode time beyond the model's shows the device waiting), and the model alone on
    pre-decoded images with mixed batching vs same-shape-only batching: images/s, images per
    batch, padding, TFLOP/s (useful FLOPs: each image's own shape) and % of the peak;
  - single-scale 224x224 (no flip, batches of 64): comparable to published VGG16 inference;
  - exactness: device fp32 (TF32 off) vs CPU fp32 (<= 1e-4 relative), and the default
    precision's centred cosine to fp32 (>= 0.995).
Weights default to random (speed and agreement do not depend on their values). `--quick`:
vgg11, Q=224 only, 3 images, short timings: a smoke test that the script still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from decoding import decode_rates
from machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype, n: int, seconds: float) -> float:
    """TFLOP/s of an n x n x n matmul in `dtype` (fp32 accumulation), best of runs."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best, start = float("inf"), time.perf_counter()
    with torch.inference_mode():
        a @ b
        sync(device)
        runs = 0
        while runs < 2 or time.perf_counter() - start < seconds:
            runs += 1
            t = time.perf_counter()
            for _ in range(5):
                a @ b
            sync(device)
            best = min(best, (time.perf_counter() - t) / 5)
    return 2 * n**3 / best / 1e12


def conv_peak(device, dtype, seconds: float) -> float:
    """TFLOP/s of a large 3x3 conv (256->256 channels, 2x96x128, channels-last), best of runs."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(2, 256, 96, 128, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(256, 256, 3, 3, device=device) * 0.05).to(dtype).contiguous(memory_format=torch.channels_last)
    best, start = float("inf"), time.perf_counter()
    with torch.inference_mode():
        F.conv2d(x, w, padding=1)
        sync(device)
        runs = 0
        while runs < 2 or time.perf_counter() - start < seconds:
            runs += 1
            t = time.perf_counter()
            F.conv2d(x, w, padding=1)
            sync(device)
            best = min(best, time.perf_counter() - t)
    return 2 * 256 * 256 * 9 * 2 * 96 * 128 / best / 1e12


def useful_flops(net, shapes, flip: bool) -> int:
    """FLOPs of every image at its own shape (padding not counted: it is waste)."""
    per = {}
    for s in shapes:
        if s not in per:
            per[s] = net.flops(*s)
    return sum(per[s] for s in shapes) * (2 if flip else 1)


def model_alone(describer, decoded, scales, batch_size, **plan) -> dict:
    """Model stage alone on pre-decoded images: seconds and batch statistics."""
    from featx.extract.batching import BatchStats
    from featx.extract.descriptor import pooled_per_scale

    stats = BatchStats()
    pooled_per_scale(describer, decoded[:2], scales, batch_size, **plan)  # warm-up: kernels, autotuning
    sync(describer.device)
    t = time.perf_counter()
    pooled_per_scale(describer, decoded, scales, batch_size, stats=stats, **plan)
    sync(describer.device)
    return {"seconds": time.perf_counter() - t, "images_per_batch": stats.images_per_batch, "padding": stats.padding}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default=str(REPO / "data" / "samples"))
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="random")
    p.add_argument("--quick", action="store_true", help="smoke mode: vgg11, Q=224, 3 images")
    p.add_argument("--images", type=int, default=0, help="use at most this many images (0 = all)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*randomly initialised VGG.*")  # this script's own choice

    import torch
    import torch.nn.functional as F

    import featx
    from featx.extract.config import ExtractConfig
    from featx.extract.decode import decode
    from featx.extract.describer import make_describer
    from featx.extract.discover import discover
    from featx.net.device import resolve_device, resolve_precision, torch_dtype

    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    model, scales = ("vgg11", (224,)) if args.quick else ("vgg16", (256, 384, 512))
    limit = 3 if args.quick else args.images
    items = discover([Path(args.folder)])
    items = items[:limit] if limit else items
    files = [it.file for it in items]
    if not files:
        raise SystemExit(f"no images under {args.folder}")
    seconds = 0.3 if args.quick else 5.0
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
        "precision": precision,
        "model": model,
        "scales": list(scales),
        "images": len(files),
        "folder": args.folder,
    }
    print(
        f"device {report['device']}; CPU {report['cpu']} ({report['cores']} cores, oneDNN ISA "
        f"{report['onednn_isa']}); torch {torch.__version__}; precision {precision}; {model}, "
        f"Q={list(scales)}, {len(files)} images from {args.folder}"
    )

    dtype = torch_dtype(precision)
    mm = matmul_peak(device, dtype, 1024 if args.quick else (8192 if device.type == "cuda" else 2048), seconds)
    conv = conv_peak(device, dtype, seconds)
    peak = max(mm, conv)
    report |= {"peak_tflops": peak, "matmul_tflops": mm, "conv3x3_tflops": conv}
    print(
        f"peak: {precision} matmul {mm:.3f} TFLOP/s, 3x3 conv {conv:.3f} TFLOP/s (measured; % of peak "
        f"below is of the larger)"
    )

    # -- decode alone ------------------------------------------------------------------
    rates = decode_rates(files, scales, args.workers, rounds=1 if args.quick else 2)
    report["decode_images_per_s"] = rates
    print("decode alone: " + ", ".join(f"{r:.1f} images/s in {name}" for name, r in rates.items()))

    # -- the Caltech descriptor, end to end ----------------------------------------------
    config = ExtractConfig(
        model=model,
        weights=args.weights,
        scales=scales,
        flip=True,
        aggregate="stack",
        device=str(device),
        workers=args.workers,
    )
    describer = make_describer(config, device, cache=True)
    net = describer.net
    decoded = [decode(f, scales, config.max_pixels) for f in files]
    shapes = [tuple(d.scaled[q].shape[1:]) for d in decoded for q in scales]
    flops = useful_flops(net, shapes, flip=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.quick:  # warm-up: CUDA context, kernels, autotuning
            featx.extract_features(files[:2], Path(tmp) / "warm.parquet", config)
            sync(device)
        result = featx.extract_features(args.folder if not limit else files, Path(tmp) / "f.parquet", config)
    e2e = {
        "images_per_s": result.images_per_second,
        "seconds": result.seconds,
        "tflops": flops / result.seconds / 1e12,
        "stage_seconds": result.stage_seconds,
        "batches": result.batches.summary(),
    }
    report["caltech_end_to_end"] = e2e
    st = result.stage_seconds
    print(
        f"Caltech descriptor end to end: {e2e['images_per_s']:.2f} images/s, {e2e['tflops']:.3f} TFLOP/s = "
        f"{100 * e2e['tflops'] / peak:.0f}% of peak; {e2e['batches']}; stages: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in st.items())
        + f" (decode runs in {args.workers} threads beside the model: decode/model = "
        f"{st['decode'] / max(args.workers, 1) / max(st['model'], 1e-9):.2f}; above 1 the device waits)"
    )

    for name, plan in (("mixed batches", {}), ("same-shape only", {"grid": 1, "max_waste": 0.0})):
        m = model_alone(describer, [d.scaled for d in decoded], scales, config.batch_size, **plan)
        m |= {"images_per_s": len(files) / m["seconds"], "tflops": flops / m["seconds"] / 1e12}
        report[f"model_{name.replace(' ', '_').replace('-', '_')}"] = m
        print(
            f"model alone, {name}: {m['images_per_s']:.2f} images/s, {m['images_per_batch']:.1f} "
            f"image-scales per batch, {100 * m['padding']:.0f}% padding, {m['tflops']:.3f} TFLOP/s = "
            f"{100 * m['tflops'] / peak:.0f}% of peak"
        )

    # -- single scale 224 x 224 ----------------------------------------------------------
    single = make_describer(config.replace(scales=(224,), flip=False), device, cache=True)
    n224 = 4 if args.quick else 256
    x = torch.randint(0, 256, (n224, 3, 224, 224), dtype=torch.uint8)
    bs = 4 if args.quick else 64
    single(x[:bs])
    sync(device)
    t = time.perf_counter()
    for s in range(0, n224, bs):
        single(x[s : s + bs])
    sync(device)
    dt = time.perf_counter() - t
    tf = n224 * net.flops(224, 224) / dt / 1e12
    report["single_224"] = {"images_per_s": n224 / dt, "tflops": tf}
    print(
        f"single scale 224x224, batch {bs}, no flip: {n224 / dt:.1f} images/s, {tf:.3f} TFLOP/s = "
        f"{100 * tf / peak:.0f}% of peak"
    )

    # -- exactness -----------------------------------------------------------------------
    few = [d.scaled for d in decoded[:3]]
    exact_cfg = config.replace(precision="fp32")
    on_cpu = make_describer(exact_cfg, torch.device("cpu"))
    from featx.extract.descriptor import combine, pooled_per_scale

    ref = combine(pooled_per_scale(on_cpu, few, scales, 8), "stack")
    on_device = on_cpu if device.type == "cpu" else make_describer(exact_cfg, device)
    dev32 = combine(pooled_per_scale(on_device, few, scales, 8), "stack")
    rel = float((dev32 - ref).abs().max() / ref.abs().max())
    fast = combine(pooled_per_scale(describer, few, scales, 8), "stack")
    centre = ref.double().mean(0, keepdim=True)
    cos = F.cosine_similarity(fast.double() - centre, ref.double() - centre, dim=1)
    report["exactness"] = {"device_fp32_vs_cpu_fp32_rel": rel, f"{precision}_centred_cosine_min": float(cos.min())}
    print(
        f"exactness: {device.type} fp32 vs cpu fp32 max relative error {rel:.1e} (<= 1e-4 "
        f"{'ok' if rel <= 1e-4 else 'FAILED'}); {precision} vs fp32 centred cosine min {float(cos.min()):.4f}"
        + (" (over 3 images: centring by so few is rough)" if len(few) < 10 else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
