"""ResNet (He et al. 2016), ResNeXt and Wide-ResNet as torchvision builds them: the stem and
layer1..layer4 are the trunk, nothing lies between the global pool and `fc`.

Taps: layer1..layer3 (their maps), pre_logits (layer4's map averaged: what `model.fc =
Identity()` gives at one scale).

featx builds these nets itself, module for module as torchvision does: the same classes' names,
attributes, order of construction and seeded init, so a state dict of either loads into the
other and `--weights random` draws the same numbers (tests/net/test_resnet_build.py, against
torchvision for all ten). That keeps torchvision's import (1.1-1.6 s, most of it torch._dynamo)
out of a run, as VGG's module does.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from featx.net.backbones.convnet import TorchvisionFamily, up_to

STAGES = ("layer1", "layer2", "layer3", "layer4")

# name -> (block, blocks per stage, groups, width per group)
CONFIGS = {
    "resnet18": ("BasicBlock", (2, 2, 2, 2), 1, 64),
    "resnet34": ("BasicBlock", (3, 4, 6, 3), 1, 64),
    "resnet50": ("Bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("Bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("Bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("Bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("Bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ("Bottleneck", (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": ("Bottleneck", (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": ("Bottleneck", (3, 4, 23, 3), 1, 128),
}


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs and the shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, **_):
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class Bottleneck(nn.Module):
    """1x1 down, 3x3 (grouped for ResNeXt, strided as torchvision's "ResNet V1.5"), 1x1 up."""

    expansion = 4

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv(cin, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, planes * self.expansion, 1)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


class ResNet(nn.Module):
    """torchvision's ResNet for one of CONFIGS: the modules, in the order torchvision makes them
    (each conv draws its default init when made, the shortcut's before its block's), then every
    conv re-drawn (Kaiming normal, fan out) in module order, BatchNorms at 1 and 0."""

    def __init__(self, name: str, num_classes: int = 1000):
        super().__init__()
        kind, depths, groups, width = CONFIGS[name]
        block = BasicBlock if kind == "BasicBlock" else Bottleneck
        self.cin = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        for i, (stage, depth) in enumerate(zip(STAGES, depths)):
            setattr(self, stage, self._stage(block, 64 << i, depth, 1 if i == 0 else 2, groups, width))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _stage(self, block, planes: int, depth: int, stride: int, groups: int, width: int) -> nn.Sequential:
        out = planes * block.expansion
        downsample = None
        if stride != 1 or self.cin != out:
            downsample = nn.Sequential(_conv(self.cin, out, 1, stride), nn.BatchNorm2d(out))
        blocks = [block(self.cin, planes, stride, downsample, groups=groups, base_width=width)]
        self.cin = out
        blocks += [block(out, planes, groups=groups, base_width=width) for _ in range(1, depth)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in STAGES:
            x = getattr(self, stage)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def split(model: nn.Module, tap: str) -> tuple[nn.Module, nn.Module]:
    """(trunk, head) of a ResNet ending at `tap`."""
    trunk = nn.Sequential(OrderedDict((n, getattr(model, n)) for n in ("conv1", "bn1", "relu", "maxpool", *STAGES)))
    return trunk if tap == "pre_logits" else up_to(trunk, tap), nn.Identity()


FAMILY = TorchvisionFamily(
    "ResNet",
    split,
    classifier=lambda model: model.fc,
    lowering="BatchNorm folded, ReLU and residual sums fused",
    make=ResNet,
)
