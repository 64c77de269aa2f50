"""EfficientNet (Tan & Le 2019) and EfficientNetV2 (2021) as torchvision builds them: `features`
(ending with the 1x1 conv to 1280 channels) is the trunk, nothing lies between the global pool
and the final Linear (only dropout).

Taps: the last block of `features` at each stride below 32 (features.1, .2, .3, .5 for B0), and
pre_logits (the last 1x1 conv's map averaged). Squeeze-excitation averages over each image's
valid positions in a padded batch (featx.net.padding).
"""

from __future__ import annotations

from torch import nn

from featx.net.backbones.convnet import TorchvisionFamily, named, up_to


def split(model: nn.Module, tap: str) -> tuple[nn.Module, nn.Module]:
    """(trunk, head) of a torchvision EfficientNet ending at `tap`."""
    return named(model, "features") if tap == "pre_logits" else up_to(named(model, "features"), tap), nn.Identity()


FAMILY = TorchvisionFamily(
    "EfficientNet", split, classifier=lambda model: model.classifier[-1], lowering="BatchNorm folded (SiLU apart)"
)
