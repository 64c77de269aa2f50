"""ConvNeXt (Liu et al. 2022) as torchvision builds it: `features` is the trunk; between the
global pool and the final Linear torchvision runs a LayerNorm over channels, which is the head.

Taps: features.1, .3, .5, .7 (the four stages' maps), pre_logits (features.7's map averaged,
then the LayerNorm: what `model.classifier[2] = Identity()` gives at one scale).

featx builds these nets itself, module for module as torchvision does: the same classes' names
(torchvision.ops' Conv2dNormActivation, Permute and StochasticDepth included), attributes, order
of construction and seeded init, so a state dict of either loads into the other and `--weights
random` draws the same numbers (tests/net/test_convnext_build.py, against torchvision for all
four). That keeps torchvision's import (1.1-1.6 s, most of it torch._dynamo) out of a run, as
ResNet's and VGG's modules do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featx.net.backbones.convnet import Pooled2d, TorchvisionFamily, named, up_to

# name -> (channels per stage, blocks per stage, stochastic depth of the last block)
CONFIGS = {
    "convnext_tiny": ((96, 192, 384, 768), (3, 3, 9, 3), 0.1),
    "convnext_small": ((96, 192, 384, 768), (3, 3, 27, 3), 0.4),
    "convnext_base": ((128, 256, 512, 1024), (3, 3, 27, 3), 0.5),
    "convnext_large": ((192, 384, 768, 1536), (3, 3, 27, 3), 0.5),
}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """The input's dimensions permuted to `dims` (a view)."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class StochasticDepth(nn.Module):
    """Drops the residual branch of each row ("row") or of the whole batch ("batch") with
    probability `p` in training, the survivors scaled by 1 / (1 - p); the identity in eval."""

    def __init__(self, p: float, mode: str):
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"drop probability has to be between 0 and 1, but got {self.p}")
        if self.mode not in ("batch", "row"):
            raise ValueError(f"mode has to be either 'batch' or 'row', but got {self.mode}")
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        size = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return x * noise

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, mode={self.mode})"


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops' conv, norm (, activation) Sequential, as ConvNeXt's stem has it: a conv
    with bias, then a norm, no activation."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module):
        super().__init__(conv, norm)
        self.out_channels = conv.out_channels


class CNBlock(nn.Module):
    """7x7 depthwise conv, LayerNorm, 1x1 MLP (4x wide, GELU) run NHWC, layer scale, residual sum."""

    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stochastic_depth(self.layer_scale * self.block(x))
        y += x
        return y


class ConvNeXt(nn.Module):
    """torchvision's ConvNeXt for one of CONFIGS: the modules in the order torchvision makes them
    (stem, then each stage's blocks and the downsample after it, then the classifier; each conv
    and Linear draws its default init when made), then every conv and Linear re-drawn (truncated
    normal, std 0.02, zero bias) in module order. Stochastic depth rises linearly over the blocks
    from 0 to the config's last value."""

    def __init__(self, name: str, num_classes: int = 1000, layer_scale: float = 1e-6):
        super().__init__()
        widths, depths, last_drop = CONFIGS[name]
        layers: list[nn.Module] = [
            Conv2dNormActivation(nn.Conv2d(3, widths[0], 4, stride=4, bias=True), LayerNorm2d(widths[0], eps=1e-6))
        ]
        total, k = sum(depths), 0
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for _ in range(depth):
                blocks.append(CNBlock(width, layer_scale, last_drop * k / (total - 1.0)))
                k += 1
            layers.append(nn.Sequential(*blocks))
            if i + 1 < len(widths):
                layers.append(nn.Sequential(LayerNorm2d(width, eps=1e-6), nn.Conv2d(width, widths[i + 1], 2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(widths[-1], eps=1e-6), nn.Flatten(1), nn.Linear(widths[-1], num_classes)
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def split(model: nn.Module, tap: str) -> tuple[nn.Module, nn.Module]:
    """(trunk, head) of a ConvNeXt ending at `tap`."""
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
    make=ConvNeXt,
)
