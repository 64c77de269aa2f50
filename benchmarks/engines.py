"""The engines a CPU user would pick instead of featx, on featx's own descriptor and images.

OpenVINO (bf16 and f32: the throughput hint, its optimal number of asynchronous requests,
dynamic shapes) and ONNX Runtime (fp32, CPU) run the same dense net, exported to ONNX once per
run from featx's own build (trunk, fc6 as a 7x7 conv, fc7 as a 1x1 conv, ReLUs, the spatial
mean). Each engine describes every image as featx does: featx's decode and resize to each Q,
featx's normalisation, the image and its flip run separately (one image per request, so no
padding), their means averaged, scales stacked or averaged, L2-normalised.

benchmarks/extract.py runs them beside featx when the packages are installed (`pip install
-e '.[benchmark]'`); benchmarks/startup.py times their start-up phases. Each measurement is a
fresh process (`child`), as featx's are.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

# Engine name -> (package it needs, OpenVINO's inference precision or None for ONNX Runtime).
ENGINES = {
    "openvino-bf16": ("openvino", "bf16"),
    "openvino-f32": ("openvino", "f32"),
    "onnxruntime-fp32": ("onnxruntime", None),
}


def available(wanted: str = "auto") -> list[str]:
    """The engines to run: `auto` = every one whose package is installed (and onnx, to export),
    `none`, or a comma-separated list (an engine that cannot run is an error)."""
    if wanted == "none":
        return []
    names = list(ENGINES) if wanted == "auto" else [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}, auto or none")
    can = [n for n in names if _installed(ENGINES[n][0]) and _installed("onnx")]
    if wanted != "auto" and can != names:
        missing = sorted({ENGINES[n][0] for n in names if n not in can} | ({"onnx"} - _found("onnx")))
        raise SystemExit(f"--engines {wanted}: install {', '.join(missing)} (pip install -e '.[benchmark]')")
    return can


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _found(package: str) -> set[str]:
    return {package} if _installed(package) else set()


# -- the net, exported once ------------------------------------------------------------------
# Bumped when the exported graph changes (the key must then miss): the opset and the Pooled head.
EXPORT_FORMAT = 1
OPSET = 17


def export_key(settings: dict) -> str:
    """What the exported file depends on: the net (model, layer), its weights' identity (a file
    by its sha256, remembered by featx's hash cache), the torch that traced it, the format."""
    import hashlib

    import torch

    from featx.extract.config import ExtractConfig
    from featx.extract.provenance import weights_identity

    config = ExtractConfig(
        model=settings["model"], weights=settings["weights"], layer=settings["layer"], seed=settings.get("seed", 0)
    )
    key = {
        "model": config.model,
        "layer": config.layer,
        "weights": weights_identity(config),
        "torch": torch.__version__,
        "format": EXPORT_FORMAT,
        "opset": OPSET,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def default_cache() -> Path:
    """Where exports are kept between benchmark runs: the system's temporary folder (each is
    the size of the weights, ~0.5 GB for VGG16, so not the user's cache folder)."""
    import tempfile

    return Path(tempfile.gettempdir()) / "featx-bench-onnx"


def exported(settings: dict, cache: Path | None = None) -> tuple[Path, dict]:
    """featx's dense net for `settings` as ONNX, exported once per key (export_key) into
    `cache`: (its path, {"seconds": export seconds or 0, "reused": whether it was there})."""
    folder = Path(cache) if cache is not None else default_cache()
    path = folder / f"dense-{settings['model']}-{settings['layer']}-{export_key(settings)}.onnx"
    if path.is_file():
        return path, {"seconds": 0.0, "reused": True, "path": str(path)}
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        seconds = export_onnx(settings, partial)
        os.replace(partial, path)  # atomic: a concurrent benchmark sees a whole file or none
    finally:
        partial.unlink(missing_ok=True)
    return path, {"seconds": seconds, "reused": False, "path": str(path)}


def export_onnx(settings: dict, path: Path) -> float:
    """featx's dense net for `settings` (model, weights, seed, layer) with the spatial mean, as
    ONNX with dynamic batch, height and width; returns the seconds it took."""
    import torch

    from featx.net.backbones import get_backbone
    from featx.net.backbones.convnet import DenseConvNet
    from featx.net.backbones.timm import SameShape
    from featx.net.weights import resolve

    t = time.perf_counter()
    weights = resolve(settings["model"], settings["weights"], settings.get("seed", 0), settings["layer"])
    net = get_backbone(settings["model"]).build(weights, settings["layer"]).eval()

    class Pooled(torch.nn.Module):
        """x -> the descriptor before L2: VGG's dense map averaged; another convnet's trunk
        averaged, then its head (DenseConvNet.forward_pooled for one image, without the padding
        bookkeeping, which would fix the traced shapes); a timm model's own pooled forward."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            if isinstance(self.net, DenseConvNet):
                return self.net.head(self.net.trunk(x).mean(dim=(2, 3)))
            if isinstance(self.net, SameShape):
                return self.net.pooled(x)
            return self.net(x).mean(dim=(2, 3))

    x = torch.zeros(1, 3, 224, 224)
    with torch.inference_mode():
        torch.onnx.export(
            Pooled(net),
            (x,),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n"}},
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter: one file, dynamic shapes, no onnxscript needed
        )
    return time.perf_counter() - t


# -- one engine, in a child process ----------------------------------------------------------
class Runner:
    """One engine's compiled net: `start(x, key)` queues one NCHW fp32 input, `wait()` returns
    {key: pooled [C]}; `phases` holds the seconds of its start-up steps."""

    def __init__(self, name: str, onnx: str):
        package, precision = ENGINES[name]
        self.phases: dict[str, float] = {}
        self.results: dict = {}
        t = time.perf_counter()
        if package == "openvino":
            import openvino as ov

            self.phases["import"] = time.perf_counter() - t
            core = ov.Core()
            t = time.perf_counter()
            model = core.read_model(onnx)
            self.phases["read"] = time.perf_counter() - t
            t = time.perf_counter()
            config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": precision}
            self.compiled = core.compile_model(model, "CPU", config)
            self.phases["compile"] = time.perf_counter() - t
            self.requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # bf16, f32
            self.queue = ov.AsyncInferQueue(self.compiled, self.requests)
            self.queue.set_callback(self._done)
            self.version = ov.get_version()
        else:
            import onnxruntime as ort

            self.phases["import"] = time.perf_counter() - t
            t = time.perf_counter()
            self.session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
            self.phases["session"] = time.perf_counter() - t
            self.requests, self.precision, self.queue = 1, "fp32", None
            self.version = ort.__version__

    def _done(self, request, key) -> None:
        self.results[key] = request.get_output_tensor(0).data[0].copy()

    def first(self, x) -> None:
        """One synchronous inference (start-up's last phase: shape inference, kernels, first run)."""
        t = time.perf_counter()
        if self.queue is not None:
            self.compiled.create_infer_request().infer({0: x})
        else:
            self.session.run(None, {"x": x})
        self.phases["first inference"] = time.perf_counter() - t

    def start(self, x, key) -> None:
        if self.queue is not None:
            self.queue.start_async({0: x}, key)
        else:
            self.results[key] = self.session.run(None, {"x": x})[0][0]

    def wait(self) -> dict:
        if self.queue is not None:
            self.queue.wait_all()
        return self.results


def normalised(pixels, mean, std):
    """uint8 [3, h, w] (a tensor or an array) -> fp32 [1, 3, h, w], normalised as featx's describer does."""
    import numpy as np

    x = np.asarray(pixels, dtype=np.float32)
    m = np.asarray(mean, np.float32).reshape(3, 1, 1) * 255.0
    s = np.asarray(std, np.float32).reshape(3, 1, 1) * 255.0
    return ((x - m) / s)[None]


def child(job: dict) -> dict:
    """Describe the job's folder with one engine; the features go to job["out"] (.npy)."""
    t = time.perf_counter()
    import numpy as np

    # featx's decode gives the engines featx's pixels; it imports torch and torchvision, which a
    # user of the engine would not (reported as `decode_imports_seconds`).
    from featx.extract.decode import decode
    from featx.extract.discover import discover
    from featx.net.weights import normalization

    decode_imports = time.perf_counter() - t
    s = job["settings"]
    t0 = time.perf_counter()
    runner = Runner(job["engine"], job["onnx"])
    setup = time.perf_counter() - t0
    mean, std = normalization(s["model"], s["weights"])
    items = discover([job["folder"]])
    scales, flip = s["scales"], s["flip"]
    t = time.perf_counter()
    for i, item in enumerate(items):
        scaled = decode(item.file, tuple(scales), 1 << 40).scaled
        for q in scales:
            x = normalised(scaled[q], mean, std)
            runner.start(x, (i, q, False))
            if flip:
                runner.start(np.ascontiguousarray(x[..., ::-1]), (i, q, True))
    out = runner.wait()
    rows = []
    for i in range(len(items)):
        per_scale = [(out[(i, q, False)] + out[(i, q, True)]) / 2 if flip else out[(i, q, False)] for q in scales]
        d = np.mean(per_scale, axis=0) if s["aggregate"] == "mean" else np.concatenate(per_scale)
        rows.append(d / np.linalg.norm(d))
    running = time.perf_counter() - t
    np.save(job["out"], np.stack(rows).astype(np.float32))
    return {
        "seconds": time.perf_counter() - t0,
        "setup_seconds": setup,
        "running_seconds": running,
        "decode_imports_seconds": decode_imports,
        "rows": len(rows),
        "paths": [it.path for it in items],
        "phases": runner.phases,
        "requests": runner.requests,
        "precision": runner.precision,
        "version": runner.version,
    }


def startup_child(job: dict) -> dict:
    """An engine's start-up on one image at one Q (benchmarks/startup.py): the seconds of each
    phase (import, read/compile or session, first inference), no flip. The image is read and
    resized by Pillow, as a user of the engine would: this process imports no torch."""
    import numpy as np
    from PIL import Image

    s = job["settings"]
    t = time.perf_counter()
    runner = Runner(job["engine"], job["onnx"])
    q = s["scales"][0]
    img = Image.open(job["image"]).convert("RGB")
    w, h = img.size
    size = (q, max(q, int(q * h / w))) if w <= h else (max(q, int(q * w / h)), q)
    pixels = np.asarray(img.resize(size, Image.Resampling.BILINEAR), np.float32).transpose(2, 0, 1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as featx's for these nets
    runner.first(normalised(pixels, mean, std))
    return {"phases": runner.phases, "seconds": time.perf_counter() - t, "precision": runner.precision}


# -- in benchmarks/extract.py ----------------------------------------------------------------
def fidelity(cosines) -> dict:
    """The figures of per-image centred cosines that the reports print: min, mean, median."""
    import numpy as np

    c = np.asarray(cosines, dtype=np.float64)
    return {
        "centred_min": float(c.min()),
        "centred_mean": float(c.mean()),
        "centred_median": float(np.median(c)),
        "images": len(c),
    }


def measure(
    names, folder: Path, settings: dict, tmp: Path, exact: dict, run_child, cosines, rounds: int, log, cache=None
) -> dict:
    """Each engine on `folder` (best whole process of `rounds`), with its fidelity to `exact`
    (path -> exact fp32 descriptor) by `cosines(fast, exact)`; the ONNX export (once per
    settings, kept in `cache`: see exported) is not counted in any engine's time."""
    import numpy as np

    if not names:
        return {}
    log(f"engines: the dense net as ONNX ({settings['model']}, {settings['layer']}), exported once ...")
    onnx, export = exported(settings, cache)
    report: dict = {"export": export}
    for name in names:
        runs = []
        for r in range(rounds):
            log(f"round {r + 1}/{rounds}: {name} on the same images ...")
            out = tmp / f"{name}.npy"
            job = {"engine": name, "onnx": str(onnx), "folder": str(folder), "out": str(out), "settings": settings}
            runs.append(run_child("engine", job))
        best = min(runs, key=lambda x: x["process_seconds"])
        paths = best.pop("paths")
        fast = np.load(tmp / f"{name}.npy").astype(np.float64)
        ref = np.stack([exact[p] for p in paths]).astype(np.float64)
        report[name] = best | {
            "all_process_seconds": [x["process_seconds"] for x in runs],
            "images_per_s": best["rows"] / best["process_seconds"],
            "images_per_s_running": best["rows"] / best["running_seconds"],
            "numerics": fidelity(cosines(fast, ref)),
        }
    return report


def print_rows(r: dict) -> None:
    """featx (its precision, and fp32 beside bf16) and the other engines on the same images, the
    same descriptor: whole processes, images/s, and centred cosines to exact fp32."""
    featx_rows = [(f"featx ({r['numerics']['precision']})", r["featx_small"], r["numerics"])]
    if r.get("featx_small_fp32"):
        featx_rows.append(("featx (fp32)", r["featx_small_fp32"], r["featx_small_fp32"]["numerics"]))
    engines = {k: v for k, v in (r.get("engines") or {}).items() if k in ENGINES}
    if len(featx_rows) == 1 and not engines:
        return
    fs = r["featx_small"]
    export = (r.get("engines") or {}).get("export")
    said = ""
    if export:
        said = " (ONNX export " + ("reused" if export["reused"] else f"{export['seconds']:.1f} s") + ", not counted)"
    print(f"\nengines on the same {fs['rows']} images, the same descriptor{said}:")
    print(
        f"{'engine':<38}{'process s':>10}{'- torch':>9}{'setup s':>9}{'img/s':>8}{'running':>9}{'/ featx':>9}"
        f"{'cos min':>9}{'cos mean':>10}"
    )
    for label, x, nm in featx_rows:
        print(
            f"{label:<38}{x['process_seconds']:>10.1f}{'':>9}{x['setup_seconds']:>9.1f}"
            f"{x['rows'] / x['process_seconds']:>8.3f}{x['images_per_s_running']:>9.3f}"
            f"{x['process_seconds'] / fs['process_seconds']:>8.2f}x{nm['centred_min']:>9.5f}{nm['centred_mean']:>10.5f}"
        )
    for name, e in engines.items():
        label = f"{name} ({e['precision']}, {e['requests']} req)"
        print(
            f"{label:<38}{e['process_seconds']:>10.1f}{e['process_seconds'] - e['decode_imports_seconds']:>9.1f}"
            f"{e['setup_seconds']:>9.1f}{e['images_per_s']:>8.3f}{e['images_per_s_running']:>9.3f}"
            f"{e['process_seconds'] / fs['process_seconds']:>8.2f}x"
            f"{e['numerics']['centred_min']:>9.5f}{e['numerics']['centred_mean']:>10.5f}"
        )
    print(
        "  (process s: whole processes, one round's best; - torch: less importing torch and torchvision, which the "
        "engines' processes do only to decode with featx's resize; setup: import, read, compile; img/s: whole "
        "process, running: once set up; / featx: process seconds over featx's at its default precision, same run; "
        "cos: per image, centred cosine to exact fp32 (the naive loop), centred by the set's mean exact descriptor)"
    )


if __name__ == "__main__":  # a child of benchmarks/startup.py
    print(json.dumps(startup_child(json.loads(sys.argv[1]))))
