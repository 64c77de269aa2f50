"""The backbones featx describes images with: one registry of names and taps, one module per family.

`get_backbone(name)` gives a Backbone: its taps (the layers a user may pick, in order from the
input), its default tap, its torchvision weights, and through its family's module (vgg: the
paper's reference, arXiv 1409.1556) its dense net, layer table and lowering. A dense net
offers the DenseNet interface below, which is all featx.extract calls.

Nothing here imports torch: ExtractConfig and the CLI check names, taps, dims and the least
scale before torch loads; a family's module loads on first use of its net.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from featx.errors import BadInput

if TYPE_CHECKING:
    import torch

    from featx.net.weights import Weights


@dataclass(frozen=True)
class Tap:
    """A layer whose map a user may describe images with."""

    name: str
    channels: int  # of its map: the descriptor's dimension per scale
    stride: int  # input pixels per map position
    min_scale: int  # the least smaller side Q that gives the map a position
    why: str  # the reason for min_scale, in words


class PooledForward(Protocol):
    """Batch -> each image's tap map averaged over its valid positions."""

    def __call__(
        self, x: torch.Tensor, sizes: list[tuple[int, int]] | None = None, rezero: bool = True
    ) -> torch.Tensor: ...


class DenseNet(Protocol):
    """What the describer needs of a backbone's dense net (an nn.Module), in two forms of one forward.

    `forward_pooled(x, sizes)`: the reference torch forward. `x` is a channels-last batch with
    each image's valid (h, w) at the top-left of a zero-padded canvas; the result is fp32 [B, C],
    each image's map averaged over its valid positions, as if the image ran alone.
    `lower(device, dtype, **options)`: the same function made fast on a device and dtype (a
    family without a lowering gives back forward_pooled itself).
    """

    channels: int

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
    taps: tuple[Tap, ...]  # in order from the input
    default_tap: str  # the paper's choice
    default_weights: str  # the torchvision weights that --weights default names

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.taps)

    def tap(self, name: str) -> Tap:
        """The tap `name`, or the one-line error that lists this backbone's taps."""
        for t in self.taps:
            if t.name == name:
                return t
        raise BadInput(f"unknown --layer {name!r} for {self.name}; choose one of {', '.join(self.tap_names)}")

    def module(self) -> ModuleType:
        """The family's module: the dense net, its weights, layer table and lowering (imports torch)."""
        return importlib.import_module(f"{__name__}.{self.family}")

    def weights_enum(self):
        """torchvision's weights enum of this net (members carry url, transforms and meta)."""
        import torchvision

        return torchvision.models.get_model_weights(self.name)

    def build(self, weights: Weights, tap: str | None = None) -> DenseNet:
        """The dense net up to `tap` (default: the default tap) with `weights`, in eval mode on the CPU."""
        return self.module().build(self.name, weights, tap or self.default_tap)

    def torchvision_model(self, weights: Weights):
        """torchvision's own model with the same weights (what the dense net is checked against)."""
        return self.module().torchvision_model(self.name, weights)

    def summary(self, height: int = 224, width: int = 224, tap: str | None = None) -> dict:
        """The dense net's layer table at height x width, with totals (no weights loaded)."""
        return self.module().model_summary(self.name, height, width, self.tap(tap or self.default_tap).name)

    def summary_lines(self, height: int = 224, width: int = 224, tap: str | None = None) -> list[str]:
        """`featx model`'s text: the layer table with totals, one line each."""
        return self.module().summary_lines(self.summary(height, width, tap))


# -- the registry -------------------------------------------------------------------------

# VGG (Simonyan & Zisserman, arXiv 1409.1556): configurations A, B, D, E, with and without BN.
VGG_TAPS = (
    Tap("pool5", 512, 32, 32, "pool5 has stride 32"),
    Tap("fc6", 4096, 32, 224, "fc6 is a 7x7 conv over pool5"),
    Tap("fc7", 4096, 32, 224, "fc6 is a 7x7 conv over pool5"),
)
VGG_NAMES = ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")

BACKBONES: dict[str, Backbone] = {name: Backbone(name, "vgg", VGG_TAPS, "fc7", "IMAGENET1K_V1") for name in VGG_NAMES}
NAMES = tuple(BACKBONES)
# Every tap name of every backbone, each once, in the backbones' order from the input.
TAP_NAMES = tuple(dict.fromkeys(t.name for b in BACKBONES.values() for t in b.taps))


def get_backbone(name: str) -> Backbone:
    """The backbone `name`, or the one-line error that lists them."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise BadInput(f"unknown --model {name!r}; choose one of {', '.join(NAMES)}") from None
