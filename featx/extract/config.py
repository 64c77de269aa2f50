"""Extraction settings as data: one frozen dataclass that serialises to JSON and hashes.

The hash covers exactly the settings that define the descriptor (Simonyan & Zisserman,
arXiv 1409.1556, Appendix B); it decides whether an existing feature file can be resumed
or reused. Settings that only change speed (device, batch size, workers) are left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Literal

from featx.errors import BadInput
from featx.net.backbones import NAMES, get_backbone
from featx.net.device import check_precision, resolve_precision

# The backbones and their taps come from featx.net.backbones (and timm:NAME, any timm model),
# precisions from featx.net.device.
MODELS = NAMES
AGGREGATES = ("mean", "stack")
# The paper's Caltech setting (Appendix B); VOC uses 256..768 with aggregate="mean".
DEFAULT_SCALES = (256, 384, 512)
# Pillow's own decompression-bomb limit: larger images are refused before decoding.
DEFAULT_MAX_PIXELS = 89_478_485

# The settings whose change changes the numbers in the feature column.
DESCRIPTOR_FIELDS = (
    "model",
    "weights",
    "layer",
    "scales",
    "flip",
    "aggregate",
    "precision",
    "bucket",
)


@dataclass(frozen=True)
class ExtractConfig:
    """What to compute for every image; `descriptor_hash()` identifies the descriptor."""

    # A backbone of featx.net.backbones (vgg16: the paper's Net-D; resnet50, convnext_tiny, ...) or timm:NAME.
    model: str = "vgg16"
    # "default" (the weights enum's DEFAULT; VGG: IMAGENET1K_V1; timm: its pretrained tag), a
    # torchvision weights name, "random", or a state-dict file.
    weights: str = "default"
    # A tap of the model, or "default": its default tap (VGG: fc7, the paper's; others: pre_logits).
    # Resolved to the tap's name on construction.
    layer: str = "default"
    scales: tuple[int, ...] = DEFAULT_SCALES
    flip: bool = True
    aggregate: Literal["mean", "stack"] = "mean"
    # "auto": bf16 where the device computes it natively (CPU with AVX512-BF16/AMX, CUDA), else
    # fp32; the resolved value enters the descriptor settings (hash and metadata).
    precision: str = "auto"
    # 0 = exact resize; N > 0 = snap the longer side to a multiple of N: INEXACT (changes the
    # numbers, recorded), kept for old feature files; mixed sizes share exact batches without it.
    bucket: int = 0
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Speed-only settings: not part of the descriptor hash.
    device: str = "auto"
    # Several devices of one type ("cuda:0,cuda:1" or "all"), each with its own stream of
    # batches into one output; "" = just `device`.
    devices: str = ""
    # A batch closes at batch_size images or batch_pixels padded pixels (0 = per device),
    # whichever comes first; images of mixed sizes share it exactly (featx.extract.batching).
    batch_size: int = 32
    batch_pixels: int = 0
    workers: int = 2
    rows_per_group: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(int(q) for q in self.scales))
        object.__setattr__(self, "layer", get_backbone(self.model).layer(self.layer))
        self.validate()

    def validate(self) -> None:
        # Torch-free for torchvision's nets; a timm model's taps are checked when it is built.
        tap = get_backbone(self.model).checked_tap(self.layer)
        if self.aggregate not in AGGREGATES:
            raise BadInput(f"unknown --aggregate {self.aggregate!r}; choose mean or stack")
        check_precision(self.precision)
        if not self.scales:
            raise BadInput("--scales is empty; give at least one scale, e.g. --scales 256,384,512")
        if len(set(self.scales)) != len(self.scales):
            raise BadInput(f"--scales {list(self.scales)} repeats a scale; give each Q once")
        if min(self.scales) < 1:
            raise BadInput(f"--scales {min(self.scales)}: a scale is the smaller side in pixels; give positive Q")
        if tap is not None and min(self.scales) < tap.min_scale:
            raise BadInput(
                f"--scales {min(self.scales)} is below {tap.min_scale}: {self.layer} needs a smaller side of "
                f"at least {tap.min_scale} pixels ({tap.why}); use larger scales"
            )
        if self.batch_size < 1:
            raise BadInput(f"--batch-size {self.batch_size} must be at least 1")
        if self.batch_pixels < 0:
            raise BadInput(f"--batch-pixels {self.batch_pixels} must be 0 (per device) or a pixel count")
        if self.workers < 0:
            raise BadInput(f"--workers {self.workers} must be 0 or more")
        if self.rows_per_group < 1:
            raise BadInput(f"rows_per_group {self.rows_per_group} must be at least 1")
        if self.max_pixels < 1:
            raise BadInput(f"--max-pixels {self.max_pixels} must be positive")
        if max(self.scales) ** 2 > self.max_pixels:  # an image rescaled to Q holds at least Q² pixels
            raise BadInput(
                f"--scales {max(self.scales)}: every image rescaled to it would hold over --max-pixels "
                f"{self.max_pixels} pixels; use Q <= {math.isqrt(self.max_pixels)} (or raise --max-pixels)"
            )
        if self.bucket < 0:
            raise BadInput(f"--bucket {self.bucket} must be 0 (exact) or a positive grid step")

    def replace(self, **changes) -> ExtractConfig:
        """A copy with `changes`; a layer that was its model's default follows a new model to its default."""
        model = changes.get("model", self.model)
        if model != self.model and "layer" not in changes and self.layer == get_backbone(self.model).default_tap:
            changes["layer"] = "default"
        return dataclasses.replace(self, **changes)

    @property
    def dim(self) -> int:
        """The descriptor's dimension (a timm model's: from the model, which imports timm)."""
        per_scale = get_backbone(self.model).tap(self.layer).channels
        return per_scale * (len(self.scales) if self.aggregate == "stack" else 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scales"] = list(self.scales)
        return d


def descriptor_settings(config: ExtractConfig, weights_id: dict, normalize: dict) -> dict:
    """The settings that define the numbers, with the weights resolved to their identity."""
    settings = {name: getattr(config, name) for name in DESCRIPTOR_FIELDS}
    settings["scales"] = list(config.scales)
    settings["precision"] = resolve_precision(config.precision, config.device)
    settings["weights"] = weights_id
    settings["normalize"] = normalize
    return settings


def settings_hash(settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
