"""The describer runs any dense net through the DenseNet interface, not only VGG's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featx.extract.describer import DenseDescriber
from featx.extract.descriptor import combine, pooled_per_scale
from featx.net.weights import IMAGENET_MEAN, IMAGENET_STD
from tests.net.test_speed_paths import images


class MeanColour(nn.Module):
    """Not a VGG: a 1x1 conv averaged over each image's valid positions, with no lowering."""

    channels = 4

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 1)

    def forward_pooled(self, x, sizes=None, rezero=True):
        y = self.conv(x)
        sizes = sizes or [tuple(x.shape[2:])] * x.shape[0]
        return torch.stack([y[i, :, :h, :w].float().mean(dim=(1, 2)) for i, (h, w) in enumerate(sizes)])

    def lower(self, device, dtype, **options):
        return self.forward_pooled

    def flops(self, height, width):
        return 2 * 3 * 4 * height * width


def by_hand(net: MeanColour, image: torch.Tensor) -> torch.Tensor:
    """The 1x1 conv of the image's mean normalised colour (a flip changes no mean)."""
    mean, std = torch.tensor(IMAGENET_MEAN) * 255, torch.tensor(IMAGENET_STD) * 255
    colour = ((image.double().mean(dim=(1, 2)) - mean) / std).float()
    with torch.inference_mode():
        return F.linear(colour, net.conv.weight.view(4, 3), net.conv.bias)


def test_any_dense_net_runs_through_the_describer_and_the_scales():
    net = MeanColour()
    d = DenseDescriber(net, IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"), "fp32", flip=True)
    assert d.channels == 4 and not d.prepacked and d.plan == net.forward_pooled
    imgs = [images(1, h, w, seed=i)[0] for i, (h, w) in enumerate([(20, 30), (33, 17), (25, 25)])]
    expected = torch.stack([by_hand(net, x) for x in imgs])
    torch.testing.assert_close(d(imgs), expected, rtol=1e-5, atol=1e-5)
    scaled = [{16: x, 24: x} for x in imgs]
    per_scale = pooled_per_scale(d, scaled, (16, 24), batch_size=2)
    torch.testing.assert_close(combine(per_scale, "mean"), F.normalize(expected), rtol=1e-5, atol=1e-6)
