"""featx on a GPU, in one command of at most ~6 minutes: versions, host syncs, first calls per
new shape, warm throughput, exactness; every figure printed and written to JSON as it comes.

    PYTHONPATH=. python benchmarks/gpu.py FOLDER [--json FILE] [--budget SECONDS]
    python benchmarks/gpu.py --device cpu --quick [FOLDER]      # smoke mode (a test runs it)

FOLDER holds real photos in class folders (default data/samples). For a lent machine, copy
caltech101-mini's photos into the git-ignored benchmarks/images (6 MB) and carry that folder:
`cp -r ../shared/data/caltech101-mini/101_ObjectCategories benchmarks/images`. The JSON goes to
--json (default $OUT/gpu.json where OUT is set, else gpu.json) and is rewritten after every
section, so a run killed at its limit keeps what it measured. Sections run while --budget
allows (each says when it is cut short). In order:
  - versions: Python, torch, torchvision, CUDA, cuDNN, driver, the GPUs (a line for several);
  - peaks: bf16 matmul, and a large 3x3 conv autotuned, timed with CUDA events;
  - decode alone (the CPU side: can it feed the device?);
  - the paper's Caltech descriptor (VGG16, Q=256,384,512, flip, stack) on the pre-decoded
    images, row group by row group as the engine runs them: CUDA's bucketed batches with cuDNN
    autotuning, first pass (each batch synchronised: time of each new shape's first call) then
    warm (CUDA events: GPU-busy fraction, peak memory), the first call against the repeat per
    new shape; then warm passes with cuDNN's heuristics (no autotuning) for buckets, the CPU's
    mixed planning, and same-shape-only batches;
  - host syncs: the warm stage + run of a few batches under torch.cuda.set_sync_debug_mode("error");
  - end to end through featx.extract_features, warm (net built and shapes tuned by a first run);
  - single-scale 224x224 (centre crops of the photos, batches of 64, no flip);
  - exactness: GPU fp32 (TF32 off) vs CPU fp32 (<= 1e-4 relative), the default precision's
    centred cosine to fp32, and fp32 from two device threads (all GPUs, or two on one) vs one;
  - with several GPUs: the warm model pass on all of them.
Weights are random by default (speed and agreement do not depend on their values). `--quick`:
vgg11, Q=224, 4 images, short timings, the same sections: a smoke test that the script runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from decoding import decode_rates
from machine import cpu_name

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Report:
    """The figures so far: printed as they come, and the JSON file rewritten after each section."""

    def __init__(self, path: Path | None):
        self.path, self.data = path, {}

    def add(self, section: str, figures: dict, line: str) -> None:
        self.data[section] = figures
        print(line, flush=True)
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


class Budget:
    """Seconds left of --budget, counted from the script's start."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - STARTED)

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- versions --------------------------------------------------------------------------------
def driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    import torch

    getter = getattr(torch._C, "_cuda_getDriverVersion", None)
    return f"CUDA driver API {getter()}" if getter else "unknown"


def versions(device) -> tuple[dict, str]:
    import torch
    import torchvision

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "device": str(device),
    }
    line = f"versions: Python {v['python']}, torch {v['torch']}, torchvision {v['torchvision']}"
    if device.type == "cuda":
        gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        p = gpus[device.index or 0]
        v |= {
            "gpu": p.name,
            "capability": f"{p.major}.{p.minor}",
            "gpu_memory_gib": round(p.total_memory / 2**30, 1),
            "sms": p.multi_processor_count,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "driver": driver_version(),
            "gpus": [g.name for g in gpus],
        }
        line += (
            f", CUDA {v['cuda']}, cuDNN {v['cudnn']}, driver {v['driver']}; {p.name} (sm {v['capability']}, "
            f"{v['sms']} SMs, {v['gpu_memory_gib']} GiB)"
        )
        if len(gpus) > 1:
            line += f"\nGPUs: {len(gpus)}: " + ", ".join(f"cuda:{i} {g.name}" for i, g in enumerate(gpus))
    return v, line + f"; CPU {v['cpu']} ({v['cores']} cores)"


# -- peaks -----------------------------------------------------------------------------------
class Clock:
    """Elapsed seconds of work queued on the device: CUDA events, or the wall clock on a CPU."""

    def __init__(self, device):
        import torch

        self.device, self.cuda = device, device.type == "cuda"
        self.start = torch.cuda.Event(enable_timing=True) if self.cuda else None
        self.end = torch.cuda.Event(enable_timing=True) if self.cuda else None

    def __enter__(self):
        if self.cuda:
            self.start.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t


def matmul_peak(device, dtype, n: int, repeats: int) -> float:
    """TFLOP/s of an n x n x n matmul in `dtype`, best of 3 runs of `repeats`."""
    import torch

    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    with torch.inference_mode():
        a @ b
        best = float("inf")
        for _ in range(3):
            with Clock(device) as c:
                for _ in range(repeats):
                    a @ b
            best = min(best, c.seconds / repeats)
    return 2 * n**3 / best / 1e12


def conv_peak(device, dtype, repeats: int) -> float:
    """TFLOP/s of a 3x3 conv (256->256 channels, 16x96x128, channels-last) under featx's CUDA
    flags (autotuned), best of 3 runs of `repeats` between two events."""
    import torch
    import torch.nn.functional as F

    from featx.extract.describer import cuda_flags

    n = 16 if device.type == "cuda" else 2
    x = torch.randn(n, 256, 96, 128, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(256, 256, 3, 3, device=device) * 0.05).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), cuda_flags() if device.type == "cuda" else _nothing():
        F.conv2d(x, w, padding=1)  # autotunes this shape
        best = float("inf")
        for _ in range(3):
            with Clock(device) as c:
                for _ in range(repeats):
                    F.conv2d(x, w, padding=1)
            best = min(best, c.seconds / repeats)
    return 2 * 256 * 256 * 9 * n * 96 * 128 / best / 1e12


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- the model alone -------------------------------------------------------------------------
def useful_flops(net, shapes) -> int:
    """FLOPs of every image at its own shape, flipped too (padding not counted: it is waste)."""
    per = {}
    for s in shapes:
        if s not in per:
            per[s] = net.flops(*s)
    return 2 * sum(per[s] for s in shapes)


class BatchTimes:
    """Wraps describer.run to time every batch: synchronised before and after (`each`: a first
    call's cost, autotuning included), else CUDA events around it (GPU time, no stall)."""

    def __init__(self, describer, each: bool):
        self.describer, self.each = describer, each
        self.records: list[tuple[tuple, object]] = []  # (slots, H, W) and seconds or an event pair

    def __enter__(self):
        import torch

        run, device, cuda = self.describer.run, self.describer.device, self.describer.cuda

        def timed(staged, rezero=True):
            shape = (staged.pixels.shape[0], *staged.pixels.shape[2:])
            if self.each or not cuda:
                sync(device)
                t = time.perf_counter()
                out = run(staged, rezero)
                sync(device)
                self.records.append((shape, time.perf_counter() - t))
                return out
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = run(staged, rezero)
            end.record()
            self.records.append((shape, (start, end)))
            return out

        self.describer.run = timed
        return self

    def __exit__(self, *exc):
        del self.describer.run  # the class's method again
        return False

    def seconds(self) -> list[tuple[tuple, float]]:
        out = []
        for shape, r in self.records:
            if isinstance(r, tuple):
                r[1].synchronize()
                r = r[0].elapsed_time(r[1]) / 1e3
            out.append((shape, r))
        return out


def model_pass(describers, groups, scales, batch_size, budget, reserve, each=False, **plan) -> dict:
    """The model alone over `groups` (lists of pre-decoded images, one per row group) until the
    budget keeps `reserve` seconds: wall time, GPU-busy fraction, shapes, peak memory."""
    import torch

    from featx.extract.batching import BatchStats
    from featx.extract.descriptor import pooled_per_scale

    d0 = describers[0]
    stats, timers = BatchStats(), [BatchTimes(d, each) for d in describers]
    if d0.cuda:
        for d in describers:
            torch.cuda.reset_peak_memory_stats(d.device)
    done, cut = 0, False
    for t in timers:
        t.__enter__()
    try:
        sync(d0.device)
        wall = time.perf_counter()
        for group in groups:
            if done and not budget.allows(reserve):
                cut = True
                break
            pooled_per_scale(describers if len(describers) > 1 else d0, group, scales, batch_size, stats=stats, **plan)
            done += len(group)
        for d in describers:
            sync(d.device)
        wall = time.perf_counter() - wall
    finally:
        for t in timers:
            t.__exit__()
    batches = [r for t in timers for r in t.seconds()]
    busy = sum(s for _, s in batches) / len(describers)
    figures = {
        "images": done,
        "cut_short_by_budget": cut,
        "seconds": wall,
        "images_per_s": done / wall if wall else 0.0,
        "batches": stats.batches,
        "shapes": len({s for s, _ in batches}),
        "images_per_batch": stats.images_per_batch,
        "padding": stats.padding,
        "gpu_busy": busy / wall if wall and d0.cuda else None,
        "per_batch": batches,
    }
    if d0.cuda:
        figures["peak_memory_gib"] = max(torch.cuda.max_memory_allocated(d.device) for d in describers) / 2**30
        figures["peak_reserved_gib"] = max(torch.cuda.max_memory_reserved(d.device) for d in describers) / 2**30
    return figures


def pass_line(name: str, m: dict, flops_per_image: float, peak: float) -> str:
    tflops = m["images"] * flops_per_image / m["seconds"] / 1e12 if m["seconds"] else 0.0
    m["tflops"] = tflops
    line = (
        f"{name}: {m['images_per_s']:.2f} images/s over {m['images']} images, {m['batches']} batches "
        f"of {m['shapes']} shapes, {m['images_per_batch']:.1f} image-scales per batch, {100 * m['padding']:.0f}% "
        f"padding, {tflops:.3f} TFLOP/s = {100 * tflops / peak:.0f}% of peak"
    )
    if m.get("gpu_busy") is not None:
        line += f"; GPU busy {100 * m['gpu_busy']:.0f}%, peak memory {m['peak_memory_gib']:.2f} GiB allocated"
        line += f" ({m['peak_reserved_gib']:.2f} reserved)"
    if m["cut_short_by_budget"]:
        line += " (cut short by --budget)"
    return line


def first_calls(cold: list[tuple[tuple, float]], warm: list[tuple[tuple, float]]) -> dict:
    """Per new shape: its first call (cold pass, synchronised) against its warm repeat."""
    repeat: dict[tuple, list[float]] = {}
    for shape, s in warm:
        repeat.setdefault(shape, []).append(s)
    seen, pairs = set(), []
    for shape, s in cold:
        if shape not in seen and shape in repeat:
            seen.add(shape)
            pairs.append((shape, s, statistics.median(repeat[shape])))
    if not pairs:
        return {"shapes": 0}
    firsts, repeats = [p[1] for p in pairs], [p[2] for p in pairs]
    return {
        "shapes": len(pairs),
        "first_call_ms_median": 1e3 * statistics.median(firsts),
        "repeat_ms_median": 1e3 * statistics.median(repeats),
        "first_over_repeat_median": statistics.median(f / max(r, 1e-9) for f, r in zip(firsts, repeats)),
        "first_calls_extra_seconds": sum(firsts) - sum(repeats),
        "per_shape": pairs,
    }


def check_syncs(describer, batches) -> str:
    """Stage and run warm batches with any synchronising CUDA call an error: 'none' or what raised."""
    import torch

    if not describer.cuda:
        return "not checked (CPU)"
    results = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for images, canvas, slots in batches:
            results.append(describer.run(describer.stage(images, canvas, slots)))
        verdict = "none"
    except RuntimeError as e:
        verdict = f"FOUND: {str(e).strip().splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for r in results:
        r.cpu()
    return verdict


# -- the run ---------------------------------------------------------------------------------
def linked_folder(items, root: Path) -> Path:
    """A folder of links to `items` at their recorded paths (class folders kept, so
    anchor/image_0001.jpg and camera/image_0001.jpg stay two images)."""
    for it in items:
        link = root / it.path
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(it.file)
        except OSError:
            link.write_bytes(it.file.read_bytes())
    return root


def centre_crop(image, side: int):
    h, w = image.shape[1:]
    top, left = (h - side) // 2, (w - side) // 2
    return image[:, top : top + side, left : left + side]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default=str(REPO / "data" / "samples"))
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="random")
    p.add_argument("--quick", action="store_true", help="smoke mode: vgg11, Q=224, 4 images")
    p.add_argument("--images", type=int, default=0, help="use at most this many images (0 = all)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run (sections stop early)")
    default_json = Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else Path("gpu.json")
    p.add_argument("--json", type=Path, default=default_json)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*randomly initialised VGG.*")  # this script's own choice
    budget = Budget(args.budget)
    report = Report(args.json)

    import torch

    from featx.net.device import resolve_device, resolve_precision, torch_dtype

    device = resolve_device(args.device)
    v, line = versions(device)
    report.add("versions", v, line)

    import torch.nn.functional as F

    import featx
    import featx.extract.describer as describer_module
    import featx.extract.local
    from featx.extract.config import ExtractConfig
    from featx.extract.decode import decode
    from featx.extract.describer import DenseDescriber, build_net, make_describer
    from featx.extract.descriptor import combine, pooled_per_scale
    from featx.extract.discover import discover
    from featx.net.weights import resolve

    quick = args.quick
    precision = resolve_precision("auto", device)
    model, scales = ("vgg11", (224,)) if quick else ("vgg16", (256, 384, 512))
    items = discover([Path(args.folder)])
    limit = 4 if quick and not args.images else args.images
    items = items[:limit] if limit else items
    files = [it.file for it in items]
    if not files:
        raise SystemExit(f"no images under {args.folder}")
    settings = {"model": model, "precision": precision, "scales": list(scales), "images": len(files)}
    report.add(
        "settings",
        settings | {"folder": args.folder},
        f"{model}, {precision}, Q={list(scales)}, {len(files)} images from {args.folder}; budget {args.budget:.0f} s",
    )

    # -- peaks ---------------------------------------------------------------------------
    dtype = torch_dtype(precision)
    cuda = device.type == "cuda"
    mm = matmul_peak(device, dtype, 8192 if cuda else 1024, 20 if cuda else 2)
    conv = conv_peak(device, dtype, 20 if cuda else 2)
    peak = max(mm, conv)
    report.add(
        "peak",
        {"matmul_tflops": mm, "conv3x3_tflops": conv, "peak_tflops": peak},
        f"peak: {precision} matmul {mm:.2f} TFLOP/s, 3x3 conv (autotuned) {conv:.2f} TFLOP/s; % of peak below is "
        f"of the larger",
    )

    # -- decode alone --------------------------------------------------------------------
    rates = decode_rates(files[: 4 if quick else 96], scales, args.workers, rounds=1)
    report.add(
        "decode_images_per_s", rates, "decode alone: " + ", ".join(f"{r:.1f} images/s in {k}" for k, r in rates.items())
    )

    # -- the model alone: the Caltech descriptor -----------------------------------------
    config = ExtractConfig(
        model=model,
        weights=args.weights,
        scales=scales,
        flip=True,
        aggregate="stack",
        device=str(device),
        workers=args.workers,
        precision=precision,
    )
    t = time.perf_counter()
    describer = make_describer(config, device, cache=True)
    build_s = time.perf_counter() - t
    with ThreadPoolExecutor(args.workers) as pool:
        decoded = list(pool.map(lambda f: decode(f, scales, config.max_pixels).scaled, files))
    groups = [decoded[s : s + config.rows_per_group] for s in range(0, len(decoded), config.rows_per_group)]
    flops = useful_flops(describer.net, [tuple(d[q].shape[1:]) for d in decoded for q in scales]) / len(decoded)
    report.add(
        "net_build_seconds", build_s, f"net built and moved to {device} in {build_s:.1f} s (not in any figure below)"
    )
    bs = config.batch_size

    on_cuda = {"buckets": True}
    cold = model_pass([describer], groups, scales, bs, budget, 150, each=True, **on_cuda)
    report.add(
        "caltech_buckets_autotuned_first_pass",
        cold,
        pass_line(
            "Caltech descriptor, model alone, buckets + cuDNN autotuning, first pass (each batch synchronised)",
            cold,
            flops,
            peak,
        ),
    )
    groups = groups[: max(1, -(-cold["images"] // config.rows_per_group))]  # what the budget let the first pass do
    warm = model_pass([describer], groups, scales, bs, budget, 0, **on_cuda)
    report.add(
        "caltech_buckets_autotuned",
        warm,
        pass_line("Caltech descriptor, model alone, buckets + autotuning, warm", warm, flops, peak),
    )
    fc = first_calls(cold["per_batch"], warm["per_batch"])
    report.add(
        "first_call_vs_repeat",
        fc,
        (
            f"first call vs repeat per new shape ({fc['shapes']} shapes): median {fc['first_call_ms_median']:.1f} ms "
            f"first, {fc['repeat_ms_median']:.1f} ms repeat ({fc['first_over_repeat_median']:.1f}x); first calls cost "
            f"{fc['first_calls_extra_seconds']:.1f} s beyond their repeats"
        )
        if fc["shapes"]
        else "first call vs repeat: no shape measured",
    )

    # Host syncs: warm batches of the first row group, staged and run under the debug mode.
    from featx.extract.batching import bucket_batches, default_batch_pixels

    q0 = scales[0]
    plan0 = bucket_batches([tuple(d[q0].shape[1:]) for d in groups[0]], bs, default_batch_pixels(device.type))
    sync_batches = [([groups[0][i][q0] for i in b.images], b.canvas, b.slots) for b in plan0[:4]]
    verdict = check_syncs(describer, sync_batches)
    report.add(
        "host_syncs_in_stage_and_run", verdict, f"host syncs in stage + run (torch.cuda.set_sync_debug_mode): {verdict}"
    )

    comparisons = [
        ("buckets, cuDNN heuristics (no autotuning)", "caltech_buckets_heuristics", {"buckets": True}),
        ("mixed planning (the CPU's), heuristics", "caltech_mixed_heuristics", {"buckets": False}),
        (
            "same-shape only, heuristics",
            "caltech_same_shape_heuristics",
            {"buckets": False, "grid": 1, "max_waste": 0.0},
        ),
    ]
    describer_module.CUDNN_AUTOTUNE = False  # read when the process flags are next set
    try:
        for name, key, plan in comparisons:
            if not budget.allows(120):
                report.add(key, None, f"{name}: skipped (--budget)")
                continue
            first = model_pass([describer], groups, scales, bs, budget, 110, **plan)
            m = model_pass(
                [describer],
                groups[: max(1, -(-first["images"] // config.rows_per_group))],
                scales,
                bs,
                budget,
                0,
                **plan,
            )
            m["first_pass_seconds"] = first["seconds"]
            report.add(
                key,
                m,
                pass_line(f"Caltech descriptor, model alone, {name}, warm", m, flops, peak)
                + f"; its first pass {first['seconds']:.1f} s",
            )
    finally:
        describer_module.CUDNN_AUTOTUNE = True

    # -- end to end -------------------------------------------------------------------------
    if budget.allows(90):
        # The engine builds its describer per run: here it reuses this process's net, so the
        # timed (second) run measures decoding, batches and writing, not building VGG.
        featx.extract.local.make_describer = functools.partial(make_describer, cache=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = linked_folder(items, Path(tmp) / "images") if limit else Path(args.folder)
            featx.extract_features(folder, Path(tmp) / "warm.parquet", config)
            result = featx.extract_features(folder, Path(tmp) / "f.parquet", config)
        st = result.stage_seconds
        e2e_tflops = result.images_per_second * flops / 1e12
        starved = st.get("decode", 0) / max(args.workers, 1) / max(st.get("model", 0), 1e-9)
        e2e = {
            "images_per_s": result.images_per_second,
            "seconds": result.seconds,
            "stage_seconds": st,
            "batches": result.batches.summary(),
            "failures": result.failures,
        }
        report.add(
            "caltech_end_to_end_warm",
            e2e,
            (
                f"Caltech descriptor end to end (warm): {e2e['images_per_s']:.2f} images/s, {e2e_tflops:.3f} TFLOP/s = "
                f"{100 * e2e_tflops / peak:.0f}% of peak; {e2e['batches']}; stages: "
                + ", ".join(f"{k} {s:.2f} s" for k, s in st.items())
                + f" (decode in {args.workers} threads beside the model: decode/model = {starved:.2f}; above 1 the "
                f"device waits)"
            ),
        )
    else:
        report.add("caltech_end_to_end_warm", None, "Caltech descriptor end to end: skipped (--budget)")

    # -- single scale 224 x 224 --------------------------------------------------------------
    if budget.allows(60):
        single = make_describer(config.replace(scales=(224,), flip=False), device, cache=True)
        with ThreadPoolExecutor(args.workers) as pool:
            crops = list(
                pool.map(
                    lambda f: centre_crop(decode(f, (256,), config.max_pixels).scaled[256], 224),
                    files[: 4 if quick else 256],
                )
            )
        b224 = 4 if quick else 64
        x = torch.stack([crops[i % len(crops)] for i in range(b224 * (1 if quick else 4))])
        single(x[:b224])
        n224 = 0
        with Clock(device) as c:
            for s in range(0, len(x), b224):
                single.run(single.stage(x[s : s + b224]))
                n224 += len(x[s : s + b224])
        tf = n224 * single.net.flops(224, 224) / c.seconds / 1e12
        report.add(
            "single_224",
            {"images_per_s": n224 / c.seconds, "tflops": tf, "batch": b224},
            (
                f"single scale 224x224 (centre crops of the photos), batch {b224}, no flip: {n224 / c.seconds:.1f} "
                f"images/s, {tf:.3f} TFLOP/s = {100 * tf / peak:.0f}% of peak"
            ),
        )
    else:
        report.add("single_224", None, "single scale 224x224: skipped (--budget)")

    # -- exactness -------------------------------------------------------------------------------
    if budget.allows(60):
        exact = config.replace(precision="fp32")
        weights = resolve(exact.model, exact.weights, exact.seed, exact.layer)
        # The CPU reference on plain kernels: no oneDNN packing, no Winograd kernels to compile.
        on_cpu = DenseDescriber(
            build_net(exact, weights), weights.mean, weights.std, torch.device("cpu"), "fp32", prepack=False
        )
        few = decoded[:3]
        ref = combine(pooled_per_scale(on_cpu, few, scales, 8), "stack")
        many = decoded[: 4 if quick else 32]
        if cuda and torch.cuda.device_count() > 1:
            others = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        else:
            others = [device, device]  # two threads on one device still share the process's flags
        describer_module.CUDNN_AUTOTUNE = False  # fp32's shapes are new: cuDNN's heuristics suffice here
        try:
            on_device = make_describer(exact, device, weights=weights, cache=True)
            dev32 = combine(pooled_per_scale(on_device, many, scales, bs), "stack")
            fast = combine(pooled_per_scale(describer, many, scales, bs), "stack")
            pair = [make_describer(exact, d, weights=weights) for d in others]
            two = combine(pooled_per_scale(pair, many, scales, bs), "stack")
        finally:
            describer_module.CUDNN_AUTOTUNE = True
        rel = float((dev32[: len(few)] - ref).abs().max() / ref.abs().max())
        centre = dev32.double().mean(0, keepdim=True)
        cos = F.cosine_similarity(fast.double() - centre, dev32.double() - centre, dim=1)
        rel_two = float((two - dev32).abs().max() / dev32.abs().max())
        figures = {
            f"{device.type}_fp32_vs_cpu_fp32_rel": rel,
            f"{precision}_centred_cosine_min": float(cos.min()),
            "images_for_cosine": len(many),
            "two_device_threads_fp32_vs_one_rel": rel_two,
            "two_device_threads_on": [str(d) for d in others],
        }
        report.add(
            "exactness",
            figures,
            (
                f"exactness: {device.type} fp32 vs cpu fp32 max relative error {rel:.1e} (<= 1e-4 "
                f"{'ok' if rel <= 1e-4 else 'FAILED'}) over {len(few)} images; {precision} vs fp32 centred cosine min "
                f"{float(cos.min()):.4f} over {len(many)} images; fp32 from threads on "
                f"{', '.join(map(str, others))} vs one: {rel_two:.1e} ({'ok' if rel_two <= 1e-4 else 'FAILED'})"
            ),
        )
    else:
        report.add("exactness", None, "exactness: skipped (--budget)")

    # -- several GPUs ---------------------------------------------------------------------------
    if cuda and torch.cuda.device_count() > 1 and budget.allows(40):
        every = [make_describer(config, torch.device("cuda", i), cache=True) for i in range(torch.cuda.device_count())]
        model_pass(every, groups[:1], scales, bs, budget, 30, **on_cuda)  # each device's first calls
        m = model_pass(every, groups, scales, bs, budget, 0, **on_cuda)
        report.add(
            "caltech_all_gpus",
            m,
            pass_line(f"Caltech descriptor on {len(every)} GPUs, warm", m, flops, peak * len(every)),
        )
    report.add("seconds", time.perf_counter() - STARTED, f"done in {time.perf_counter() - STARTED:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
