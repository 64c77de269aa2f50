"""Compatibility name for tests outside featx/net: VGG's dense net now lives in featx.net.backbones.vgg.

Kept for the merge of issue 21 only; import from featx.net.backbones.vgg instead.
"""

from featx.net.backbones.vgg import torchvision_model as torchvision_vgg

__all__ = ["torchvision_vgg"]
