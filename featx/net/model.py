"""VGG applied densely: the conv trunk, then fc6 as a 7x7 conv and fc7 as a 1x1 conv.

Paper, Sec. 3.2 and Appendix B: at test time the fully connected layers become convolutions
so the net runs on the whole rescaled image and yields a class-score (here: fc7) map.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from featx.errors import BadInput
from featx.net.weights import Weights


class DenseVGG(nn.Module):
    """`trunk` ends with pool5; `head` is fc6 (7x7 conv) + ReLU [+ fc7 (1x1 conv) + ReLU]."""

    def __init__(self, trunk: nn.Sequential, head: nn.Sequential):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def flops(self, height: int, width: int) -> int:
        """FLOPs of one forward pass on a height x width image: 2 x the convs' multiply-adds.

        Bias, ReLU, BN and pooling are left out (well under 0.1% for VGG), as is usual.
        """
        total, h, w = 0, height, width
        for m in list(self.trunk) + list(self.head):
            if isinstance(m, nn.Conv2d):
                (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
                h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
                w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
                total += 2 * (m.in_channels // m.groups) * kh * kw * m.out_channels * h * w
            elif isinstance(m, nn.MaxPool2d):
                k, s, p, d = (v[0] if isinstance(v, tuple) else v for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation))
                span_h, span_w = h + 2 * p - d * (k - 1) - 1, w + 2 * p - d * (k - 1) - 1
                h = (-(-span_h // s) if m.ceil_mode else span_h // s) + 1
                w = (-(-span_w // s) if m.ceil_mode else span_w // s) + 1
        return total


def linear_as_conv(linear: nn.Linear, in_channels: int, kernel: int) -> nn.Conv2d:
    """The same weights as a conv: (out, in*k*k) -> (out, in, k, k), in torchvision's C,H,W order.

    The conv shares the Linear's storage: no random init and no copy of fc6's 411 MB.
    """
    conv = nn.utils.skip_init(nn.Conv2d, in_channels, linear.out_features, kernel_size=kernel,
                              device=linear.weight.device, dtype=linear.weight.dtype)
    shape = (linear.out_features, in_channels, kernel, kernel)
    conv.weight = nn.Parameter(linear.weight.detach().view(shape), requires_grad=linear.weight.requires_grad)
    conv.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
    return conv


def dense_from_torchvision(vgg: torchvision.models.VGG, layer: str = "fc7") -> DenseVGG:
    """Reshape torchvision's classifier into the paper's fully convolutional net, up to `layer`."""
    fc6, fc7 = vgg.classifier[0], vgg.classifier[3]
    head: list[nn.Module] = []
    if layer in ("fc6", "fc7"):
        head += [linear_as_conv(fc6, 512, 7), nn.ReLU(inplace=True)]
    if layer == "fc7":
        head += [linear_as_conv(fc7, fc6.out_features, 1), nn.ReLU(inplace=True)]
    return DenseVGG(vgg.features, nn.Sequential(*head)).eval()


def torchvision_vgg(model: str, weights: Weights) -> torchvision.models.VGG:
    """torchvision's own VGG with the given weights (a seeded random init for 'random')."""
    builder = getattr(torchvision.models, model)
    if weights.state_dict is None:
        # Seeded without disturbing the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights.identity["seed"])
            return builder(weights=None).eval()
    with torch.device("meta"):  # no random init of 138M parameters that the state dict replaces
        vgg = builder(weights=None)
    try:
        vgg.load_state_dict(weights.state_dict, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise BadInput(
            f"--weights {weights.identity.get('file', weights.identity)} does not fit {model} "
            f"({first[:160]}); pass the --model it was saved from"
        ) from None
    return vgg.eval()


def build(model: str, weights: Weights, layer: str = "fc7") -> DenseVGG:
    return dense_from_torchvision(torchvision_vgg(model, weights), layer)
