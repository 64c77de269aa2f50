"""Resolve `--weights` to a state dict and its identity: the backbone's published weights, a file, or random.

torchvision's weights come from its registry (`get_model_weights(name)`: 'default' is the enum's
DEFAULT, for VGG IMAGENET1K_V1) with mean/std and resize from the weights' own transforms; a
timm model's from its pretrained config, downloaded through timm (Hugging Face Hub). A state-dict
FILE and 'random' work offline for every backbone.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from featx.errors import BadInput, MissingData, Unreachable, option
from featx.net.backbones import get_backbone

# torchvision's ImageNet statistics, used when torchvision weights carry none (file, random).
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
    """The member of the backbone's torchvision weights enum that `name` names ('default': its DEFAULT)."""
    enum = get_backbone(model).weights_enum()
    if name == "default":
        return enum.DEFAULT
    try:
        return enum[name.split(".")[-1]]
    except KeyError:
        raise BadInput(
            f"unknown --weights {name!r} for {model}; use 'default', one of "
            f"{', '.join(m.name for m in enum)}, 'random', or a state-dict file"
        ) from None


def is_file_weights(name: str) -> bool:
    return name not in ("default", "random") and (
        os.sep in name or "/" in name or name.endswith((".pth", ".pt", ".bin", ".safetensors")) or Path(name).exists()
    )


def _is_timm(model: str) -> bool:
    return get_backbone(model).family == "timm"


def identify(
    model: str, name: str, seed: int = 0, layer: str | None = None, file_sha256: Callable[[Path], str] | None = None
) -> dict:
    """The identity of `--weights` without loading it (nothing is downloaded): a file is hashed,
    by `file_sha256` where given (a caller that remembers hashes), else read in full."""
    if name == "random":
        return {"kind": "random", "seed": seed}
    if is_file_weights(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise MissingData(
                f"--weights {name}: no such file; give a state dict (.pth) for {model}, 'default', or 'random'"
            )
        return {"kind": "file", "file": path.name, "sha256": (file_sha256 or sha256_file)(path)}
    if _is_timm(model):
        return get_backbone(model).module().weights_identity(model, name)
    w = _torchvision_weights(model, name)
    layer = layer or get_backbone(model).default_tap
    if w.name == "IMAGENET1K_FEATURES" and layer != "pool5":
        raise BadInput(
            f"--weights {w} holds only the conv trunk (its classifier is undefined), so it "
            f"cannot give {layer}; use --layer pool5 or --weights default"
        )
    return {"kind": "torchvision", "name": str(w), "url": w.url}


def normalization(model: str, name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the net expects: torchvision weights' own (else ImageNet's), a timm model's config."""
    if _is_timm(model):
        cfg = get_backbone(model).module().pretrained_cfg(model)
        return tuple(cfg["mean"]), tuple(cfg["std"])
    if name in ("random",) or is_file_weights(name):
        return IMAGENET_MEAN, IMAGENET_STD
    t = _torchvision_weights(model, name).transforms()
    return tuple(t.mean), tuple(t.std)


def preprocessing(model: str, name: str) -> dict | None:
    """How the weights' publisher preprocessed images (resize, crop, interpolation): provenance only,
    featx resizes by its own rule (the paper's smaller side Q). None for a file or random torchvision net."""
    if _is_timm(model):
        cfg = get_backbone(model).module().pretrained_cfg(model)
        keys = ("input_size", "interpolation", "crop_pct", "crop_mode")
        return {"source": "timm pretrained_cfg"} | {k: cfg[k] for k in keys if k in cfg}
    if name == "random" or is_file_weights(name):
        return None
    t = _torchvision_weights(model, name).transforms()
    return {
        "source": "torchvision weights transforms",
        "resize_size": list(t.resize_size) if t.resize_size else None,
        "crop_size": list(t.crop_size),
        "interpolation": t.interpolation.value,
    }


def resolve(model: str, name: str, seed: int = 0, layer: str | None = None, identity: dict | None = None) -> Weights:
    """Load `--weights`: torchvision's or timm's through their own API and cache, a file, or random.
    `identity`: its identify() already known (a file is then not hashed again)."""
    identity = identity or identify(model, name, seed, layer)
    mean, std = normalization(model, name)
    if identity["kind"] == "random":
        warnings.warn(
            f"--weights random gives a randomly initialised {get_backbone(model).title}: its features are for "
            "tests and smoke runs only, not for recognition",
            stacklevel=2,
        )
        return Weights(identity, None, mean, std)
    if identity["kind"] == "file":
        return Weights(identity, _load_file(Path(name).expanduser(), model), mean, std)
    if identity["kind"] == "timm":
        return Weights(identity, get_backbone(model).module().pretrained_state_dict(model), mean, std)
    w = _torchvision_weights(model, name)
    try:
        state = w.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
        raise Unreachable(
            f"cannot download {w} from {w.url} ({reason(e)}); torch looks for it at {cached}: "
            f"copy the file there, or pass --weights FILE (a torchvision state dict), "
            f"or --weights random for a smoke test"
        ) from None
    return Weights(identity, state, mean, std)


def instantiate(
    make: Callable[[], nn.Module],
    weights: Weights,
    model: str,
    *,
    on_meta: bool = True,
    misfit: Callable[[dict, dict], str] | None = None,
) -> nn.Module:
    """`make()` with `weights`, in eval mode on the CPU: a seeded random init for 'random' (the
    caller's global RNG untouched), else the state dict loaded. `on_meta`: build on the meta device
    and take the state dict's tensors by assignment (no random init of what they replace); nets
    with buffers that state dicts leave out (timm's) copy into a normally built net instead.
    A state dict that does not load is refused in one line: `misfit(given, expected)` says why
    (a family's own words), else `misfit_text`."""
    if weights.state_dict is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights.identity["seed"])
            return make().eval()
    net = on_meta_device(make) if on_meta else make()
    try:
        net.load_state_dict(weights.state_dict, assign=on_meta)
    except RuntimeError:
        why = (misfit or misfit_text(model))(weights.state_dict, net.state_dict())
        name = weights.identity.get("file", weights.identity.get("name", weights.identity))
        raise BadInput(f"{option('weights', str(name))} does not fit {model}: {why}") from None
    return net.eval()


def misfit_text(model: str) -> Callable[[dict, dict], str]:
    """Why a state dict does not load into `model`, in full words (never cut mid-token), and the fix."""

    def explain(given: dict, expected: dict) -> str:
        differ = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
        absent = [k for k in expected if k not in given]
        extra = [k for k in given if k not in expected]
        if differ:
            k = differ[0]
            shape = "x".join(map(str, given[k].shape))
            what = f"{k} is {shape}, {model} needs {'x'.join(map(str, expected[k].shape))}"
        elif absent:
            what = f"{absent[0]} is missing"
        else:
            what = f"{extra[0]} is not one of {model}'s" if extra else "its tensors are not the ones it has"
        count = len(differ) + len(absent) + len(extra) or 1
        return (
            f"{count} tensor(s) differ ({what}); give {option('model', 'NAME')} of the net they were saved from, "
            f"or weights saved from {model} with torch.save(model.state_dict(), FILE)"
        )

    return explain


def on_meta_device(make: Callable[[], nn.Module]) -> nn.Module:
    """`make()` with its parameters and buffers on the meta device (no memory, no init).

    `with torch.device("meta")` first; a builder that computes with tensors on the way (RegNet's
    widths: arange, .tolist()) cannot run there, and gets MetaParameters instead.
    """
    try:
        with torch.device("meta"):
            return make()
    except (NotImplementedError, RuntimeError):
        with MetaParameters():
            return make()


class MetaParameters(TorchFunctionMode):
    """Like `with torch.device("meta")`, but only for the factories that make parameters and
    buffers (empty, zeros, ones, full, randn, rand): a builder's own arithmetic (arange, tensor,
    .tolist()) stays on the CPU."""

    FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.full, torch.randn, torch.rand)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def reason(e: Exception) -> str:
    """The reason of a download failure, in a few words."""
    why = getattr(e, "reason", None) or e
    first = (str(why).strip().splitlines() or [type(e).__name__])[0]
    return first.split(". ")[0].rstrip(".")  # the first sentence


def _load_file(path: Path, model: str) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            try:
                # Mapped, not read: each weight is read once, as the net is lowered (VGG16: 0.2 s less).
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (pre-zip) torch.save file cannot be mapped: read it whole
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise BadInput(
            f"--weights {path}: cannot read it as a torch state dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); give a .pth state dict for {model}"
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
