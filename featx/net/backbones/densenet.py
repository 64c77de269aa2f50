"""DenseNet (Huang et al. 2017) as torchvision builds it: `features` (ending with norm5) and the
ReLU torchvision applies after it are the trunk; nothing lies between the global pool and the
classifier.

Taps: features.denseblock1..4 (each dense block's map, before its transition), pre_logits
(norm5 + ReLU averaged).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from featx.net.backbones.convnet import TorchvisionFamily, named, up_to


def split(model: nn.Module, tap: str) -> tuple[nn.Module, nn.Module]:
    """(trunk, head) of a torchvision DenseNet ending at `tap`."""
    if tap == "pre_logits":
        return nn.Sequential(
            OrderedDict([("features", model.features), ("relu", nn.ReLU(inplace=True))])
        ), nn.Identity()
    return up_to(named(model, "features"), tap), nn.Identity()


# Its layers normalise before their convs: only the stem's BatchNorm follows a conv.
FAMILY = TorchvisionFamily(
    "DenseNet", split, classifier=lambda model: model.classifier, lowering="the stem's BatchNorm folded, ReLU fused"
)
