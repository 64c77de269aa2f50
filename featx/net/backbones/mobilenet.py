"""MobileNetV3 (Howard et al. 2019) as torchvision builds it: `features` is the trunk; between the
global pool and the final Linear torchvision runs Linear + Hardswish (+ dropout), which is the head.

Taps: the last block of `features` at each stride, the last 1x1 conv (features.12 small,
features.16 large), and pre_logits (its map averaged, then the classifier up to its last
Linear). Squeeze-excitation averages over each image's valid positions (featx.net.padding).
"""

from __future__ import annotations

from torch import nn

from featx.net.backbones.convnet import TorchvisionFamily, named, up_to


def split(model: nn.Module, tap: str) -> tuple[nn.Module, nn.Module]:
    """(trunk, head) of a torchvision MobileNetV3 ending at `tap`."""
    if tap == "pre_logits":
        return named(model, "features"), model.classifier[:-1]
    return up_to(named(model, "features"), tap), nn.Identity()


FAMILY = TorchvisionFamily(
    "MobileNetV3",
    split,
    classifier=lambda model: model.classifier[-1],
    lowering="BatchNorm folded, ReLU fused (Hardswish apart)",
)
