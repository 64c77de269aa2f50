"""How long a short job waits before its first batch: featx's start-up phases, and OpenVINO's.

    python benchmarks/startup.py [--weights file|FILE|random] [--model vgg16] [--scales 224] [--rounds 3]

One image at one Q (no flip), each measurement a fresh process, best of --rounds, with featx's
cache folder (XDG_CACHE_HOME) cold (empty: the weights file is hashed, the Winograd transforms
compiled) and warm (filled by a first run). The weights default to a state-dict FILE, as a
user passes one: torchvision's random init saved to a temporary file (VGG16: 528 MB; it stays
in the page cache, which this benchmark does not drop). It prints:
  - featx's phases, each as `featx extract` runs it: import torch, featx's own imports (and
    whatever they load: torchvision only for nets other than VGG), the weights' identity (a
    file: its remembered sha256), loading the weights,
    building the net, lowering it (packing for oneDNN, Winograd kernels), the first batch
    (decode, resize, model); and hashing the file with nothing remembered, once;
  - the sum from `import torch` done to the first batch, cold and warm: the target is 1.5 s or
    less on a warm cache; and whether the run loaded torchvision (1 s of imports: torch._dynamo);
  - whole processes: `featx extract IMAGE` (to its Parquet file), cold and warm, beside
    `python -c "import torch"`; and featx extract's imports by package;
  - OpenVINO bf16 and f32 (throughput hint) and ONNX Runtime on the same image, where installed:
    import, read/compile (or session), first inference, and the whole process (the dense net
    exported to ONNX once per settings, not counted: benchmarks/engines.py).
All figures go to JSON.
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

import engines

REPO = Path(__file__).resolve().parents[1]
PHASES = (
    "import torch",
    "featx imports",
    "weights identity",
    "load weights",
    "build net",
    "lower (pack)",
    "first batch",
)


def child_phases(job: dict) -> dict:
    """featx's start-up in this fresh process, phase by phase, through the calls `featx extract` makes."""
    t = time.perf_counter()
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        marks[name] = now - t
        t = now

    import torch

    mark("import torch")
    import featx.cli  # noqa: F401  (what `featx extract` loads before the run)
    from featx.extract.config import ExtractConfig
    from featx.extract.decode import decode
    from featx.extract.describer import DenseDescriber, build_net
    from featx.extract.provenance import weights_identity
    from featx.extract.run import extract_features  # noqa: F401
    from featx.net.device import resolve_device
    from featx.net.weights import resolve

    mark("featx imports")
    s = job["settings"]
    config = ExtractConfig(**s)
    identity = weights_identity(config)
    mark("weights identity")
    weights = resolve(config.model, config.weights, config.seed, config.layer, identity)
    mark("load weights")
    net = build_net(config, weights)
    mark("build net")
    device = resolve_device(config.device)
    describer = DenseDescriber(net, weights.mean, weights.std, device, config.precision, config.flip)
    mark("lower (pack)")
    q = config.scales[0]
    describer([decode(job["image"], (q,), 1 << 40).scaled[q]])
    mark("first batch")
    return {
        "phases": marks,
        "precision": describer.precision,
        "threads": torch.get_num_threads(),
        "torchvision_loaded": "torchvision" in sys.modules,
    }


def child_hash(job: dict) -> dict:
    """Hashing the weights file with nothing remembered: what every run paid before the cache."""
    from featx.net.weights import sha256_file

    t = time.perf_counter()
    sha256_file(Path(job["weights"]))
    return {"seconds": time.perf_counter() - t}


def run(args: list[str], cache: Path | None = None) -> tuple[float, str]:
    """A fresh process (featx's cache folder under `cache`, where given): (its wall seconds, its
    stdout); a failure stops the benchmark."""
    env = os.environ | ({"XDG_CACHE_HOME": str(cache)} if cache is not None else {})
    t = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {args[1:3]} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def child(kind: str, job: dict, cache: Path | None = None) -> dict:
    seconds, out = run([sys.executable, __file__, "--child", kind, json.dumps(job)], cache)
    return json.loads(out.strip().splitlines()[-1]) | {"process_seconds": seconds}


def best(runs: list[dict], key: str = "process_seconds") -> dict:
    return min(runs, key=lambda r: r[key])


def random_weights_file(model: str, folder: Path) -> Path:
    """torchvision's random init of `model` saved as a state dict (VGG16: 528 MB): a weights
    FILE as a user passes one, without downloading anything."""
    import torch
    import torchvision

    path = folder / f"{model}-random.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(model, weights=None).state_dict(), path)
    return path


def import_breakdown(cli_args: list[str], cache: Path) -> dict[str, float]:
    """Seconds of `featx extract`'s imports by package (its own time, python -X importtime),
    torch's submodules by their first level (torch._dynamo, which torchvision pulls in, apart)."""
    env = os.environ | {"XDG_CACHE_HOME": str(cache)}
    proc = subprocess.run([sys.executable, "-X", "importtime", *cli_args], capture_output=True, text=True, env=env)
    totals: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = [x.strip() for x in line[len("import time:") :].split("|")]
        if not parts[0].isdigit():  # the header line
            continue
        name = parts[2].split(".")
        key = ".".join(name[:2]) if name[0] == "torch" and len(name) > 1 else name[0]
        totals[key] = totals.get(key, 0.0) + int(parts[0]) / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument(
        "--weights",
        default="file",
        help="file (default: torchvision's random init saved to a temporary state-dict file), a state-dict FILE, "
        "random (in-process init: a smoke path), or default",
    )
    p.add_argument("--layer", default="fc7")
    p.add_argument("--scales", default="224", help="one Q (the first of a list is used)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--image", default=str(REPO / "data" / "samples" / "anchor" / "image_0001.jpg"))
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per cache state; best counts")
    p.add_argument("--engines", default="auto", help="auto (those installed), none, or a list (benchmarks/engines.py)")
    p.add_argument("--onnx-cache", default=None, help="where the engines' ONNX export is kept (default: temp folder)")
    p.add_argument("--json", default="bench-startup.json")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, job = args.child[0], json.loads(args.child[1])
        print(json.dumps({"phases": child_phases, "hash": child_hash}[kind](job)))
        return 0

    q = int(args.scales.split(",")[0])
    names = engines.available(args.engines)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="featx-startup-") as tmp:
        tmp = Path(tmp)
        weights = args.weights
        if weights == "file":
            log(f"saving {args.model}'s random init as a state-dict file ...")
            weights = str(random_weights_file(args.model, tmp))
        settings = {
            "model": args.model,
            "weights": weights,
            "layer": args.layer,
            "scales": [q],
            "flip": False,
            "precision": args.precision,
            "device": "cpu",
        }
        report: dict = {"settings": settings, "image": args.image, "load_average_start": os.getloadavg()}
        is_file = Path(weights).expanduser().is_file()
        if is_file:
            report["weights_file_mb"] = Path(weights).stat().st_size / 1e6
        out = tmp / "one.parquet"
        cli = ["-m", "featx", "extract", args.image, "-o", str(out), "--model", args.model]
        cli += ["--weights", weights, "--layer", args.layer, "--scales", str(q), "--no-flip", "--quiet"]
        cli += ["--precision", args.precision, "--device", "cpu", "--overwrite"]
        # Cold: featx's cache folder empty (the weights' hash, the compiled Winograd transforms to
        # be made); warm: the one a first run filled. The file stays in the page cache either way.
        warm_cache = tmp / "cache-warm"
        log("priming the warm cache: one featx extract ...")
        run([sys.executable, *cli], warm_cache)
        report["featx"] = {}
        for state in ("cold", "warm"):
            phases, wholes = [], []
            for r in range(args.rounds):
                log(f"{state} cache, round {r + 1}/{args.rounds}: featx phases, featx extract ...")
                cache = warm_cache if state == "warm" else tmp / f"cache-cold-{r}-phases"
                phases.append(child("phases", {"settings": settings, "image": args.image}, cache))
                cache = warm_cache if state == "warm" else tmp / f"cache-cold-{r}-extract"
                wholes.append(run([sys.executable, *cli], cache)[0])
            per_phase = {name: min(r["phases"][name] for r in phases) for name in PHASES}
            report["featx"][state] = {
                "phases_best": per_phase,
                "phases_median": {name: statistics.median(r["phases"][name] for r in phases) for name in PHASES},
                "after_torch": sum(v for k, v in per_phase.items() if k != "import torch"),
                "torchvision_loaded": any(r["torchvision_loaded"] for r in phases),
                "extract_process_seconds": min(wholes),
            }
        report["featx"] |= {"precision": phases[0]["precision"], "threads": phases[0]["threads"]}
        log("import torch alone; featx extract's imports by package ...")
        report["import_torch_process_seconds"] = min(
            run([sys.executable, "-c", "import torch"])[0] for _ in range(args.rounds)
        )
        report["imports_by_package"] = import_breakdown(cli, warm_cache)
        if is_file:
            log("hashing the weights file with nothing remembered (what each run paid before) ...")
            report["featx"]["hash_cold_seconds"] = min(
                child("hash", {"weights": weights})["seconds"] for _ in range(max(1, args.rounds))
            )
        if names:
            log("engines: the dense net as ONNX, exported once ...")
            onnx, report["export"] = engines.exported(settings | {"seed": 0}, args.onnx_cache)
            report["engines"] = {}
            for name in names:
                log(f"{name}: start-up, {args.rounds + 1} rounds (the first a warm-up) ...")
                job = {"engine": name, "onnx": str(onnx), "image": args.image, "settings": settings}
                runs = []
                for _ in range(args.rounds + 1):
                    seconds, text = run([sys.executable, str(Path(__file__).with_name("engines.py")), json.dumps(job)])
                    runs.append(json.loads(text.strip().splitlines()[-1]) | {"process_seconds": seconds})
                runs = runs[1:]
                b = best(runs)
                report["engines"][name] = b | {
                    "phases_best": {k: min(r["phases"][k] for r in runs) for k in b["phases"]},
                    "all_process_seconds": [r["process_seconds"] for r in runs],
                }
    report["load_average_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, is_file)
    print(f"all figures: {args.json}")
    return 0


def print_report(r: dict, is_file: bool) -> None:
    from machine import cpu_isa, cpu_name

    s, f = r["settings"], r["featx"]
    weights = f"a {r['weights_file_mb']:.0f} MB state-dict file" if is_file else s["weights"]
    print(
        f"\nstart-up to the first batch: {s['model']} ({s['layer']}), weights {weights}, one image at "
        f"Q={s['scales'][0]}, no flip; featx precision {f['precision']} ({s['precision']}), {f['threads']} threads"
    )
    print(
        f"machine: {cpu_name()} ({cpu_isa()}), {os.cpu_count()} cores; load average "
        f"{r['load_average_start'][0]:.1f} -> {r['load_average_end'][0]:.1f}"
    )
    print(f"{'featx phase':<24}{'cold best':>10}{'median':>8}{'warm best':>11}{'median':>8}")
    for name in PHASES:
        c, w = f["cold"], f["warm"]
        print(
            f"{name:<24}{c['phases_best'][name]:>10.3f}{c['phases_median'][name]:>8.3f}"
            f"{w['phases_best'][name]:>11.3f}{w['phases_median'][name]:>8.3f}"
        )
    if is_file:
        print(f"  (hashing the file with nothing remembered: {f['hash_cold_seconds']:.3f} s)")
    for state in ("cold", "warm"):
        x = f[state]
        print(
            f"{state} cache: from `import torch` done to the first batch {x['after_torch']:.2f} s"
            + (" (target <= 1.5 s)" if state == "warm" else "")
            + f" (torchvision {'loaded' if x['torchvision_loaded'] else 'not loaded'}); "
            f"whole `featx extract` process {x['extract_process_seconds']:.2f} s"
        )
    base = r["import_torch_process_seconds"]
    print(
        f"python -c 'import torch': {base:.2f} s; featx extract on a warm cache takes "
        f"{f['warm']['extract_process_seconds'] - base:.2f} s more"
    )
    top = list(r["imports_by_package"].items())[:10]
    print("featx extract's imports by package (own time): " + ", ".join(f"{k} {v:.2f} s" for k, v in top))
    for name, e in (r.get("engines") or {}).items():
        parts = ", ".join(f"{k} {v:.3f} s" for k, v in e["phases_best"].items())
        print(f"{name} ({e['precision']}): {parts}; whole process {e['process_seconds']:.2f} s")
    if r.get("engines"):
        e = r["export"]
        said = "reused" if e["reused"] else f"exported in {e['seconds']:.1f} s"
        print(f"  (the engines' ONNX file: {said}, not counted)")


if __name__ == "__main__":
    sys.exit(main())
