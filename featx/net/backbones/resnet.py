"""ResNet (He et al. 2016), ResNeXt and Wide-ResNet as torchvision builds them: the stem and
layer1..layer4 are the trunk, nothing lies between the global pool and `fc`.

Taps: layer1..layer3 (their maps), pre_logits (layer4's map averaged: what `model.fc =
Identity()` gives at one scale).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from featx.net.backbones.convnet import TorchvisionFamily, up_to

STAGES = ("layer1", "layer2", "layer3", "layer4")


def split(model: nn.Module, tap: str) -> tuple[nn.Module, nn.Module]:
    """(trunk, head) of a torchvision ResNet ending at `tap`."""
    trunk = nn.Sequential(OrderedDict((n, getattr(model, n)) for n in ("conv1", "bn1", "relu", "maxpool", *STAGES)))
    return trunk if tap == "pre_logits" else up_to(trunk, tap), nn.Identity()


FAMILY = TorchvisionFamily(
    "ResNet", split, classifier=lambda model: model.fc, lowering="BatchNorm folded, ReLU and residual sums fused"
)
