"""What a feature file records about how its numbers were made, and the settings hash that names them.

`provenance` is a feature file's `featx` metadata; its `settings_hash` (of the settings that
define the descriptor, weights resolved to their identity) decides whether existing features
can be resumed or reused; `config_from_provenance` rebuilds the ExtractConfig that describes
new images as a file's rows were described.
"""

from __future__ import annotations

import hashlib
import json
import platform
from functools import cache
from pathlib import Path

import torch

from featx import __version__
from featx.errors import BadInput, MissingData, SettingsMismatch, option
from featx.extract.config import ExtractConfig, descriptor_settings, settings_hash
from featx.extract.decode import RESIZE
from featx.net.backbones import get_backbone
from featx.net.device import torch_dtype
from featx.net.weights import identify, normalization, preprocessing, sha256_file
from featx.store.atomic import write_json
from featx.userdirs import cache_dir

# Weights files are identified by their sha256; hashing 0.5 GB per call would cost more than
# the call, so the hash is remembered while the file's size and mtime stay the same: for the
# last few files only, so that a long-lived process (a notebook, a server) does not grow.
_FILE_IDS: dict[tuple, dict] = {}
FILE_IDS_KEPT = 16
# ...and across processes: hashing VGG16's 528 MB took ~0.5 s of every run's start-up. One small
# JSON file per file state (path, size, mtime, inode) in the user's cache folder, written
# atomically: concurrent processes at worst hash a file twice and write the same entry; a
# changed file is another state, so it is hashed again. At most HASHES_KEPT entries are kept.
HASHES_KEPT = 256


def forget_file_hashes() -> None:
    """Forget the remembered weights-file hashes (in this process; the cache folder's stay)."""
    _FILE_IDS.clear()


def _file_state(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def file_sha256(path: Path) -> str:
    """The sha256 of a weights file, remembered in the cache folder while the file is unchanged."""
    state = _file_state(path)
    folder = cache_dir() / "weights-sha256"
    entry = folder / (hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:32] + ".json")
    try:
        known = json.loads(entry.read_text(encoding="utf-8"))
        if known.get("state") == state and isinstance(known.get("sha256"), str) and len(known["sha256"]) == 64:
            return known["sha256"]
    except (OSError, ValueError, AttributeError):  # none yet, or unreadable: hash the file
        pass
    digest = sha256_file(path)
    if _file_state(path) != state:  # changed while it was read: do not remember either state
        return digest
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json({"state": state, "sha256": digest}, entry)
        _forget_oldest(folder)
    except OSError:  # a read-only or full cache folder costs a hash per run, nothing else
        pass
    return digest


def _forget_oldest(folder: Path) -> None:
    entries = list(folder.glob("*.json"))
    if len(entries) <= HASHES_KEPT:
        return
    by_age = sorted(entries, key=lambda f: f.stat().st_mtime_ns if f.exists() else 0)
    for old in by_age[: len(entries) - HASHES_KEPT]:
        old.unlink(missing_ok=True)


def weights_identity(config: ExtractConfig) -> dict:
    """The identity of `config.weights` (a file's sha256 is remembered while it is unchanged)."""
    path = Path(config.weights).expanduser()
    if config.weights not in ("default", "random") and path.is_file():
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, config.model, config.layer)
        if key not in _FILE_IDS:
            while len(_FILE_IDS) >= FILE_IDS_KEPT:
                del _FILE_IDS[next(iter(_FILE_IDS))]  # the oldest
            _FILE_IDS[key] = identify(config.model, config.weights, config.seed, config.layer, file_sha256)
        return _FILE_IDS[key]
    return identify(config.model, config.weights, config.seed, config.layer)


def _normalize_record(mean, std) -> dict:
    return {"mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]}


def _preprocess(mean, std) -> dict:
    return _normalize_record(mean, std) | {"resize": RESIZE}


def descriptor_hash(config: ExtractConfig) -> str:
    """The settings hash of the descriptor `config` defines (weights files are hashed, not loaded)."""
    mean, std = normalization(config.model, config.weights)
    return settings_hash(descriptor_settings(config, weights_identity(config), _preprocess(mean, std)))


def provenance(
    config: ExtractConfig, device: torch.device | str, weights_id: dict | None = None, regions: dict | None = None
) -> dict:
    """The `featx` metadata of a feature file: what defines the numbers, and how they were run.

    `regions` (featx.extract.regions' identity of a regions table) enters the settings: a file of
    region features resumes only with the same table.
    """
    weights_id = weights_id if weights_id is not None else weights_identity(config)
    mean, std = normalization(config.model, config.weights)
    settings = descriptor_settings(config, weights_id, _preprocess(mean, std))
    if regions is not None:
        settings["regions"] = regions
    backbone = get_backbone(config.model)
    mixed = backbone.mixes_sizes()
    libraries = {"torch": torch.__version__, "torchvision": torchvision_version()}
    if backbone.family == "timm":
        import timm

        libraries["timm"] = timm.__version__
    return {
        "featx_version": __version__,
        "settings": settings,
        "settings_hash": settings_hash(settings),
        "model": config.model,
        "weights": weights_id,
        "layer": config.layer,
        "scales": list(config.scales),
        "flip": config.flip,
        "aggregate": config.aggregate,
        "precision": settings["precision"],  # "auto" resolved for the device
        "bucket": config.bucket,
        "dim": config.dim,
        "normalize": _normalize_record(mean, std),
        "resize": RESIZE,
        # How the weights' publisher resized and cropped (featx resizes by its own rule, above).
        "weights_preprocessing": preprocessing(config.model, config.weights),
        "descriptor": describe(config),
        "device": str(device),
        "conv_kernels": backbone.kernels(torch.device(str(device).split(",")[0]), torch_dtype(settings["precision"])),
        "batching": (
            "mixed sizes share padded batches, exactly (the padding is kept out of every image)"
            if mixed
            else "same-shape images only (this net cannot keep a padded batch's padding out of an image)"
        ),
        "batch_size": config.batch_size,
        "batch_pixels": config.batch_pixels,
        **libraries,
        "python": platform.python_version(),
    }


@cache  # constant for the process
def torchvision_version() -> str | None:
    """torchvision.__version__ (e.g. 0.29.1+cu130), read from its version.py without importing
    torchvision (about 1.2 s of a short run's start-up); the installed distribution's version
    where that file cannot be read; None without torchvision."""
    import importlib.metadata
    import importlib.util
    import re

    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or []:
        try:
            text = (Path(folder) / "version.py").read_text()
        except OSError:
            continue
        if m := re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M):
            return m.group(1)
    try:
        return importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(config: ExtractConfig) -> str:
    """The descriptor `config` defines, in words (the paper's protocol, arXiv 1409.1556, Appendix B)."""
    backbone = get_backbone(config.model)
    if backbone.family == "timm" and backbone.module().is_vit(config.model):
        what = (
            ("class token" if config.layer == "cls" else "patch tokens averaged")
            + " after the final norm, position embeddings interpolated to each scale's grid, sides centre-cropped "
            "to multiples of the patch"
        )
    elif backbone.family == "vgg" or config.layer != "pre_logits":
        what = f"{config.layer} map averaged over positions"
    else:
        what = (
            "pre_logits: the last map averaged over positions (the global pool), then what the model runs "
            "before its last Linear"
        )
    return (
        what
        + (", averaged with the flipped image" if config.flip else "")
        + f", {config.aggregate} over Q={list(config.scales)}, L2-normalised"
    )


def config_from_provenance(
    prov: dict,
    *,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int = ExtractConfig.batch_size,
    workers: int = 2,
) -> ExtractConfig:
    """The ExtractConfig that describes new images as a feature file's rows were described.

    `prov` is the file's `featx` metadata. A weights file is recorded by name and sha256 only,
    so its path must be given as `weights`. The rebuilt settings must give the file's settings
    hash: a query described otherwise would not be comparable with the rows.
    """
    settings = prov.get("settings") or {}
    identity = settings.get("weights") or prov.get("weights") or {}
    kind = identity.get("kind")
    if weights is None:
        if kind == "random":
            weights = "random"
        elif kind == "torchvision":
            weights = identity["name"]
        elif kind == "timm":  # the model's name carries the tag that names them
            weights = "default"
        elif kind == "file":
            raise MissingData(
                f"the features were made with the weights file {identity.get('file')} "
                f"(sha256 {str(identity.get('sha256'))[:12]}…); pass its path with {option('weights', 'FILE')}"
            )
        else:
            raise BadInput(f"the feature file records no weights ({identity!r}); it was not written by featx extract")
    try:
        config = ExtractConfig(
            model=settings.get("model", prov.get("model")),
            weights=weights,
            layer=settings.get("layer", prov.get("layer")),
            scales=tuple(settings.get("scales", prov.get("scales", ()))),
            flip=bool(settings.get("flip", prov.get("flip"))),
            aggregate=settings.get("aggregate", prov.get("aggregate")),
            precision=settings.get("precision", prov.get("precision")),
            bucket=int(settings.get("bucket", prov.get("bucket", 0)) or 0),
            seed=int(identity.get("seed", 0)) if kind == "random" else 0,
            device=device,
            batch_size=batch_size,
            workers=workers,
        )
    except TypeError as e:  # a field missing from an old or foreign file
        raise BadInput(f"the feature file's provenance is incomplete ({e}); extract the features again") from None
    # Region features describe crops with the same descriptor: the regions table is no setting of it.
    recorded = {k: v for k, v in settings.items() if k != "regions"}
    want = settings_hash(recorded) if recorded else prov.get("settings_hash")
    got = descriptor_hash(config)
    if want is not None and got != want:
        from featx.store import differing

        new = provenance(config, device="cpu")
        raise SettingsMismatch(
            f"the rebuilt descriptor settings do not match the feature file's "
            f"({differing(prov, new)}); pass the weights the features were made with"
        )
    return config
