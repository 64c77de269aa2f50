"""ConvNeXt (Liu et al. 2022) as torchvision builds it: `features` is the trunk; between the
global pool and the final Linear torchvision runs a LayerNorm over channels, which is the head.

Taps: features.1, .3, .5, .7 (the four stages' maps), pre_logits (features.7's map averaged,
then the LayerNorm: what `model.classifier[2] = Identity()` gives at one scale).
"""

from __future__ import annotations

from torch import nn

from featx.net.backbones.convnet import Pooled2d, TorchvisionFamily, named, up_to


def split(model: nn.Module, tap: str) -> tuple[nn.Module, nn.Module]:
    """(trunk, head) of a torchvision ConvNeXt ending at `tap`."""
    if tap == "pre_logits":
        return named(model, "features"), Pooled2d(model.classifier[0])
    return up_to(named(model, "features"), tap), nn.Identity()


FAMILY = TorchvisionFamily("ConvNeXt", split, classifier=lambda model: model.classifier[-1])
