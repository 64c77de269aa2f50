"""Resolve `--weights` to a state dict and its identity: torchvision's, a file, or random."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from featx.errors import BadInput, MissingData, Unreachable
from featx.net.backbones import get_backbone

# torchvision's ImageNet statistics, used when the weights carry none (file, random).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Weights:
    """Where the numbers of the net come from, and how its input is normalised."""

    identity: dict  # recorded in the Parquet metadata and hashed
    state_dict: dict | None  # None: random init with identity["seed"]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _torchvision_weights(model: str, name: str):
    """The member of the backbone's torchvision weights enum that `name` names ('default': the backbone's)."""
    backbone = get_backbone(model)
    enum = backbone.weights_enum()
    member = backbone.default_weights if name == "default" else name.split(".")[-1]
    try:
        return enum[member]
    except KeyError:
        raise BadInput(
            f"unknown --weights {name!r} for {model}; use 'default', one of "
            f"{', '.join(m.name for m in enum)}, 'random', or a state-dict file"
        ) from None


def is_file_weights(name: str) -> bool:
    return name not in ("default", "random") and (
        os.sep in name or "/" in name or name.endswith((".pth", ".pt", ".bin")) or Path(name).exists()
    )


def identify(
    model: str, name: str, seed: int = 0, layer: str = "fc7", file_sha256: Callable[[Path], str] | None = None
) -> dict:
    """The identity of `--weights` without loading it (nothing is downloaded): a file is hashed,
    by `file_sha256` where given (a caller that remembers hashes), else read in full."""
    if name == "random":
        return {"kind": "random", "seed": seed}
    if is_file_weights(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise MissingData(
                f"--weights {name}: no such file; give a torchvision state dict (.pth) "
                f"for {model}, 'default', or 'random'"
            )
        return {"kind": "file", "file": path.name, "sha256": (file_sha256 or sha256_file)(path)}
    w = _torchvision_weights(model, name)
    if w.name == "IMAGENET1K_FEATURES" and layer != "pool5":
        raise BadInput(
            f"--weights {w} holds only the conv trunk (its classifier is undefined), so it "
            f"cannot give {layer}; use --layer pool5 or --weights default"
        )
    return {"kind": "torchvision", "name": str(w), "url": w.url}


def normalization(model: str, name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the net expects: the torchvision weights' own, else ImageNet's."""
    if name in ("random",) or is_file_weights(name):
        return IMAGENET_MEAN, IMAGENET_STD
    t = _torchvision_weights(model, name).transforms()
    return tuple(t.mean), tuple(t.std)


def resolve(model: str, name: str, seed: int = 0, layer: str = "fc7", identity: dict | None = None) -> Weights:
    """Load `--weights`: torchvision's through its own API and cache, a file, or random.
    `identity`: its identify() already known (a file is then not hashed again)."""
    identity = identity or identify(model, name, seed, layer)
    if identity["kind"] == "random":
        warnings.warn(
            "--weights random gives a randomly initialised VGG: its features are for "
            "tests and smoke runs only, not for recognition",
            stacklevel=2,
        )
        return Weights(identity, None)
    if identity["kind"] == "file":
        return Weights(identity, _load_file(Path(name).expanduser(), model))
    w = _torchvision_weights(model, name)
    try:
        state = w.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
        raise Unreachable(
            f"cannot download {w} from {w.url} ({_reason(e)}); torch looks for it at {cached}: "
            f"copy the file there, or pass --weights FILE (a torchvision state dict), "
            f"or --weights random for a smoke test"
        ) from None
    return Weights(identity, state, *normalization(model, name))


def _reason(e: Exception) -> str:
    reason = getattr(e, "reason", None) or e
    return str(reason).strip() or type(e).__name__


def _load_file(path: Path, model: str) -> dict:
    try:
        try:
            # Mapped, not read: each weight is read once, as the net is lowered (VGG16: 0.2 s less).
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (pre-zip) torch.save file cannot be mapped: read it whole
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise BadInput(
            f"--weights {path}: cannot read it as a torch state dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); give a torchvision .pth file for {model}"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(
            f"--weights {path}: the file holds a {type(state).__name__}, not a state dict of "
            f"tensors; save one with torch.save(model.state_dict(), FILE)"
        )
    return state


def sha256_file(path: Path) -> str:
    """The file's sha256, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
