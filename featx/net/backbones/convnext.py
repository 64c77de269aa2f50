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


# NCHW in fp32 on a CPU: the 7x7 depthwise convs run 1.6x faster so under oneDNN's AVX2 kernels
# (2.68 vs 1.66 img/s for the whole net, 2 images at 384x512; in bf16 the two layouts are within 5%).
FAMILY = TorchvisionFamily(
    "ConvNeXt",
    split,
    classifier=lambda model: model.classifier[-1],
    nchw_on_cpu_fp32=True,
    lowering="each block's MLP two packed GEMMs, GELU fused, layer scale folded",
)
