"""The backbones featx describes images with: one registry of names and taps, one module per family.

`get_backbone(name)` gives a Backbone: its taps (the layers a user may pick, in order from the
input), its default tap (the paper's logic: the last map before the classifier; VGG's fc7, every
other net's pre-logits), its weights (torchvision's registry; timm's pretrained config), and
through its family's module its dense net, layer table and lowering. Families: vgg (the paper's
reference, arXiv 1409.1556, with its own lowered Plan), resnet (ResNet, ResNeXt, Wide-ResNet),
convnext, efficientnet (and V2), regnet, densenet, mobilenet (V3), all through convnet; and
`timm:NAME` for any timm model (`pip install 'featx[timm]'`), convnets and ViTs. A dense net
offers the DenseNet interface below, which is all featx.extract calls.

Nothing here imports torch: ExtractConfig and the CLI check torchvision names, taps, dims and the
least scale before torch loads (the taps are data below; a test checks them against the nets).
A timm model's taps are known when it is built (their names are checked here).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

from featx.errors import BadInput

if TYPE_CHECKING:
    import torch

    from featx.net.weights import Weights


@dataclass(frozen=True)
class Tap:
    """A layer whose map a user may describe images with."""

    name: str
    channels: int  # of its descriptor per scale (0: known when a timm model is built)
    stride: int  # input pixels per map position
    min_scale: int  # the least smaller side Q that gives the map a position
    why: str  # the reason for min_scale, in words


@dataclass(frozen=True)
class LayerRow:
    """One line of a layer table: a layer or block, its output shape, parameters and FLOPs."""

    name: str
    kind: str
    shape: tuple[int, ...]  # of the output: C, H, W of a map; C of a vector; N, C of tokens
    params: int
    flops: int


def layer_summary(
    model: str,
    layer: str,
    height: int,
    width: int,
    rows: list[LayerRow],
    counted_by: str,
    reference_params: int,
    classifier_params: int,
) -> dict:
    """A dense net's layer table with its totals, as every family's `model_summary` returns it.

    `reference_params` is the library's own count for the whole model (`counted_by`: torchvision
    or timm), `classifier_params` its last Linear's, which the descriptor does not use.
    """
    return {
        "model": model,
        "layer": layer,
        "input": (3, height, width),
        "rows": rows,
        "params": sum(r.params for r in rows),
        "flops": sum(r.flops for r in rows),
        "counted_by": counted_by,
        "reference_params": reference_params,
        "classifier_params": classifier_params,
    }


class PooledForward(Protocol):
    """Batch -> each image's tap map averaged over its valid positions."""

    def __call__(
        self, x: torch.Tensor, sizes: list[tuple[int, int]] | None = None, rezero: bool = True
    ) -> torch.Tensor: ...


class DenseNet(Protocol):
    """What the describer needs of a backbone's dense net (an nn.Module), in two forms of one forward.

    `forward_pooled(x, sizes)`: the reference torch forward. `x` is a channels-last batch with
    each image's valid (h, w) at the top-left of a zero-padded canvas; the result is fp32 [B, C],
    each image's map averaged over its valid positions (then the net's head), as if the image
    ran alone. `mixes_sizes`: False for a net that takes same-shape batches only (a ViT's token
    grid, a timm convnet whose padding cannot be kept out). `lower(device, dtype, **options)`:
    the same function made fast on a device and dtype (a family without a lowering gives back
    forward_pooled itself).
    """

    channels: int
    mixes_sizes: bool

    def forward_pooled(
        self, x: torch.Tensor, sizes: list[tuple[int, int]] | None = None, rezero: bool = True
    ) -> torch.Tensor: ...

    def lower(self, device: torch.device, dtype: torch.dtype, **options: Any) -> PooledForward: ...

    def flops(self, height: int, width: int) -> int: ...


@dataclass(frozen=True)
class Backbone:
    """One net featx can make dense: its declaration here, its code in featx.net.backbones.<family>."""

    name: str
    family: str  # the module in featx.net.backbones that builds it
    title: str  # the family in words: VGG, ResNet, ...
    taps: tuple[Tap, ...]  # in order from the input
    default_tap: str  # the paper's choice: the last map before the classifier
    # False: the taps' channels, strides and least scales come from the built net (timm:NAME).
    declared: bool = True

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.taps)

    def layer(self, name: str) -> str:
        """A --layer value as this backbone's tap name ('default': its default tap), checked."""
        name = self.default_tap if name in ("default", None) else name
        if name not in self.tap_names:
            raise BadInput(f"unknown --layer {name!r} for {self.name}; choose one of {', '.join(self.tap_names)}")
        return name

    def checked_tap(self, name: str) -> Tap | None:
        """The tap `name` as declared (None for a timm model: known when built), or the one-line error."""
        name = self.layer(name)
        return next(t for t in self.taps if t.name == name) if self.declared else None

    def tap(self, name: str) -> Tap:
        """The tap `name` with its channels, stride and least scale (a timm model: from the net, imports torch)."""
        return self.checked_tap(name) or self.module().tap(self.name, self.layer(name))

    def module(self):
        """The family's code: the dense net, its weights, layer table and lowering (imports torch)."""
        module = importlib.import_module(f"{__name__}.{self.family}")
        return getattr(module, "FAMILY", module)

    def weights_enum(self):
        """torchvision's weights enum of this net (members carry url, transforms and meta)."""
        import torchvision

        return torchvision.models.get_model_weights(self.name)

    def build(self, weights: Weights, tap: str | None = None) -> DenseNet:
        """The dense net up to `tap` (default: the default tap) with `weights`, in eval mode on the CPU."""
        return self.module().build(self.name, weights, self.layer(tap))

    def torchvision_model(self, weights: Weights):
        """The library's own model with the same weights (what the dense net is checked against)."""
        return self.module().torchvision_model(self.name, weights)

    def summary(self, height: int = 224, width: int = 224, tap: str | None = None) -> dict:
        """The dense net's layer table at height x width, with totals (no weights loaded)."""
        return self.module().model_summary(self.name, height, width, self.layer(tap))

    def summary_lines(self, height: int = 224, width: int = 224, tap: str | None = None) -> list[str]:
        """`featx model`'s text: the layer table with totals, one line each."""
        return self.module().summary_lines(self.summary(height, width, tap))

    def kernels(self, device: torch.device, dtype: torch.dtype) -> str:
        """How the net runs on `device` in `dtype`, in words (provenance)."""
        return self.module().kernels(device, dtype)

    def mixes_sizes(self) -> bool:
        """Whether images of different sizes share padded batches exactly; else same-shape batches only."""
        return self.module().mixes_sizes(self.name)


# -- the registry -------------------------------------------------------------------------

# VGG (Simonyan & Zisserman, arXiv 1409.1556): configurations A, B, D, E, with and without BN.
VGG_TAPS = (
    Tap("pool5", 512, 32, 32, "pool5 has stride 32"),
    Tap("fc6", 4096, 32, 224, "fc6 is a 7x7 conv over pool5"),
    Tap("fc7", 4096, 32, 224, "fc6 is a 7x7 conv over pool5"),
)
VGG_NAMES = ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")

# The family modules in words (messages: "a randomly initialised ResNet").
TITLES = {
    "vgg": "VGG",
    "resnet": "ResNet",
    "convnext": "ConvNeXt",
    "efficientnet": "EfficientNet",
    "regnet": "RegNet",
    "densenet": "DenseNet",
    "mobilenet": "MobileNetV3",
    "timm": "timm model",
}

# Each layout of taps: (tap, stride, least scale), in order from the input; the last, pre_logits, is the default.
TAP_LAYOUTS = {
    "resnet": (
        ("layer1", 4, 1),
        ("layer2", 8, 1),
        ("layer3", 16, 1),
        ("pre_logits", 32, 1),
    ),
    "convnext": (
        ("features.1", 4, 4),
        ("features.3", 8, 8),
        ("features.5", 16, 16),
        ("features.7", 32, 32),
        ("pre_logits", 32, 32),
    ),
    "efficientnet": (
        ("features.1", 2, 1),
        ("features.2", 4, 1),
        ("features.3", 8, 1),
        ("features.5", 16, 1),
        ("pre_logits", 32, 1),
    ),
    "regnet": (
        ("trunk_output.block1", 4, 1),
        ("trunk_output.block2", 8, 1),
        ("trunk_output.block3", 16, 1),
        ("pre_logits", 32, 1),
    ),
    "densenet": (
        ("features.denseblock1", 4, 1),
        ("features.denseblock2", 8, 5),
        ("features.denseblock3", 16, 13),
        ("features.denseblock4", 32, 29),
        ("pre_logits", 32, 29),
    ),
    "mobilenet_v3_small": (
        ("features.0", 2, 1),
        ("features.1", 4, 1),
        ("features.3", 8, 1),
        ("features.8", 16, 1),
        ("features.12", 32, 1),
        ("pre_logits", 32, 1),
    ),
    "mobilenet_v3_large": (
        ("features.1", 2, 1),
        ("features.3", 4, 1),
        ("features.6", 8, 1),
        ("features.12", 16, 1),
        ("features.16", 32, 1),
        ("pre_logits", 32, 1),
    ),
}
# Each torchvision convnet: its family (the module that builds it), its taps' layout, their channels.
# Generated from the nets; tests/net/test_families.py checks every entry against them.
CONVNETS: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "resnet18": ("resnet", "resnet", (64, 128, 256, 512)),
    "resnet34": ("resnet", "resnet", (64, 128, 256, 512)),
    "resnet50": ("resnet", "resnet", (256, 512, 1024, 2048)),
    "resnet101": ("resnet", "resnet", (256, 512, 1024, 2048)),
    "resnet152": ("resnet", "resnet", (256, 512, 1024, 2048)),
    "resnext50_32x4d": ("resnet", "resnet", (256, 512, 1024, 2048)),
    "resnext101_32x8d": ("resnet", "resnet", (256, 512, 1024, 2048)),
    "resnext101_64x4d": ("resnet", "resnet", (256, 512, 1024, 2048)),
    "wide_resnet50_2": ("resnet", "resnet", (256, 512, 1024, 2048)),
    "wide_resnet101_2": ("resnet", "resnet", (256, 512, 1024, 2048)),
    "convnext_tiny": ("convnext", "convnext", (96, 192, 384, 768, 768)),
    "convnext_small": ("convnext", "convnext", (96, 192, 384, 768, 768)),
    "convnext_base": ("convnext", "convnext", (128, 256, 512, 1024, 1024)),
    "convnext_large": ("convnext", "convnext", (192, 384, 768, 1536, 1536)),
    "efficientnet_b0": ("efficientnet", "efficientnet", (16, 24, 40, 112, 1280)),
    "efficientnet_b1": ("efficientnet", "efficientnet", (16, 24, 40, 112, 1280)),
    "efficientnet_b2": ("efficientnet", "efficientnet", (16, 24, 48, 120, 1408)),
    "efficientnet_b3": ("efficientnet", "efficientnet", (24, 32, 48, 136, 1536)),
    "efficientnet_b4": ("efficientnet", "efficientnet", (24, 32, 56, 160, 1792)),
    "efficientnet_b5": ("efficientnet", "efficientnet", (24, 40, 64, 176, 2048)),
    "efficientnet_b6": ("efficientnet", "efficientnet", (32, 40, 72, 200, 2304)),
    "efficientnet_b7": ("efficientnet", "efficientnet", (32, 48, 80, 224, 2560)),
    "efficientnet_v2_s": ("efficientnet", "efficientnet", (24, 48, 64, 160, 1280)),
    "efficientnet_v2_m": ("efficientnet", "efficientnet", (24, 48, 80, 176, 1280)),
    "efficientnet_v2_l": ("efficientnet", "efficientnet", (32, 64, 96, 224, 1280)),
    "regnet_y_400mf": ("regnet", "regnet", (48, 104, 208, 440)),
    "regnet_y_800mf": ("regnet", "regnet", (64, 144, 320, 784)),
    "regnet_y_1_6gf": ("regnet", "regnet", (48, 120, 336, 888)),
    "regnet_y_3_2gf": ("regnet", "regnet", (72, 216, 576, 1512)),
    "regnet_y_8gf": ("regnet", "regnet", (224, 448, 896, 2016)),
    "regnet_y_16gf": ("regnet", "regnet", (224, 448, 1232, 3024)),
    "regnet_y_32gf": ("regnet", "regnet", (232, 696, 1392, 3712)),
    "regnet_y_128gf": ("regnet", "regnet", (528, 1056, 2904, 7392)),
    "regnet_x_400mf": ("regnet", "regnet", (32, 64, 160, 400)),
    "regnet_x_800mf": ("regnet", "regnet", (64, 128, 288, 672)),
    "regnet_x_1_6gf": ("regnet", "regnet", (72, 168, 408, 912)),
    "regnet_x_3_2gf": ("regnet", "regnet", (96, 192, 432, 1008)),
    "regnet_x_8gf": ("regnet", "regnet", (80, 240, 720, 1920)),
    "regnet_x_16gf": ("regnet", "regnet", (256, 512, 896, 2048)),
    "regnet_x_32gf": ("regnet", "regnet", (336, 672, 1344, 2520)),
    "densenet121": ("densenet", "densenet", (256, 512, 1024, 1024, 1024)),
    "densenet161": ("densenet", "densenet", (384, 768, 2112, 2208, 2208)),
    "densenet169": ("densenet", "densenet", (256, 512, 1280, 1664, 1664)),
    "densenet201": ("densenet", "densenet", (256, 512, 1792, 1920, 1920)),
    "mobilenet_v3_small": ("mobilenet", "mobilenet_v3_small", (16, 16, 24, 48, 576, 1024)),
    "mobilenet_v3_large": ("mobilenet", "mobilenet_v3_large", (16, 24, 40, 112, 960, 1280)),
}  # fmt: skip


def _convnet_taps(layout: str, channels: tuple[int, ...]) -> tuple[Tap, ...]:
    return tuple(
        Tap(name, c, stride, q, f"{name} has stride {stride}" + (f"; below {q} it has no position" if q > 1 else ""))
        for (name, stride, q), c in zip(TAP_LAYOUTS[layout], channels, strict=True)
    )


BACKBONES: dict[str, Backbone] = {name: Backbone(name, "vgg", "VGG", VGG_TAPS, "fc7") for name in VGG_NAMES}
BACKBONES.update(
    {
        name: Backbone(name, family, TITLES[family], _convnet_taps(layout, channels), "pre_logits")
        for name, (family, layout, channels) in CONVNETS.items()
    }
)
NAMES = tuple(BACKBONES)
# Every tap name of every backbone, each once, in the backbones' order from the input.
TAP_NAMES = tuple(dict.fromkeys(t.name for b in BACKBONES.values() for t in b.taps))

# timm:NAME (optional extra): the taps a timm model may have; channels come from the built model.
TIMM_PREFIX = "timm:"
TIMM_TAPS = (
    Tap("pre_logits", 0, 0, 1, "known when built"),  # convnets: the pooled map (+ head norm); ViTs: patch tokens' mean
    Tap("cls", 0, 0, 1, "known when built"),  # ViTs: the class token after the final norm
)
_TIMM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


@cache
def _timm_backbone(name: str) -> Backbone:
    return Backbone(name, "timm", TITLES["timm"], TIMM_TAPS, "pre_logits", declared=False)


def get_backbone(name: str) -> Backbone:
    """The backbone `name` (a torchvision name, or timm:NAME), or the one-line error that lists them."""
    if isinstance(name, str) and name.startswith(TIMM_PREFIX) and _TIMM_NAME.fullmatch(name[len(TIMM_PREFIX) :]):
        return _timm_backbone(name)
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise BadInput(
            f"unknown --model {name!r}; choose one of {', '.join(NAMES)}, or timm:NAME for a timm model"
        ) from None
