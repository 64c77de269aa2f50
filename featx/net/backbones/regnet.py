"""RegNetX and RegNetY (Radosavovic et al. 2020) as torchvision builds them: the stem and the four
stages of `trunk_output` are the trunk, nothing lies between the global pool and `fc`.

Taps: trunk_output.block1..block3 (their maps), pre_logits (block4's map averaged). RegNetY's
squeeze-excitation averages over each image's valid positions in a padded batch (featx.net.padding).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from featx.net.backbones.convnet import TorchvisionFamily, up_to


def split(model: nn.Module, tap: str) -> tuple[nn.Module, nn.Module]:
    """(trunk, head) of a torchvision RegNet ending at `tap`."""
    trunk = nn.Sequential(OrderedDict([("stem", model.stem), ("trunk_output", model.trunk_output)]))
    return trunk if tap == "pre_logits" else up_to(trunk, tap), nn.Identity()


FAMILY = TorchvisionFamily("RegNet", split, classifier=lambda model: model.fc)
