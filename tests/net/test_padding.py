"""featx.net.padding: hooks that keep a padded batch's padding out of every image, for any convnet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featx.net.padding import ExactPadding, Inexact, mixes, probe, randomize_, size_rule, valid_mean
from featx.net.shapes import layer_out_size, out_size


class SqueezeExcite(nn.Module):
    """Squeeze-excitation as torchvision writes it: a global average pool module inside the net."""

    def __init__(self, c: int, functional: bool = False):
        super().__init__()
        self.pool, self.fc, self.functional = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1), functional

    def forward(self, x):
        s = x.mean(dim=(2, 3), keepdim=True) if self.functional else self.pool(x)
        return x * torch.sigmoid(self.fc(s))


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def tiny(functional_se: bool = False) -> nn.Module:
    """Every kind of layer the hooks follow: strided and padded convs, max and average pools (in
    ceil mode and leaving their padding out of the count: timm's ResNet-D), a residual sum,
    squeeze-excitation, BatchNorm, depthwise conv."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.SiLU())),
        SqueezeExcite(8, functional_se),
        nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False),
        nn.AvgPool2d(3, 1, padding=1, count_include_pad=False),
        nn.Conv2d(8, 16, 5, stride=2, padding=2),
        nn.BatchNorm2d(16),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = net.eval()
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.3)
    return randomize_(net, seed=1)


SIZES = [(37, 52), (52, 41), (44, 44), (52, 52)]


def batch_and_alone(net: nn.Module, fill: bool = True, masks: bool = False):
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, h, w, generator=g) for h, w in SIZES]
    canvas = torch.zeros(len(SIZES), 3, 52, 52)
    for i, (h, w) in enumerate(SIZES):
        canvas[i, :, :h, :w] = images[i][0]
    hooks = ExactPadding(net, masks=masks)
    with torch.inference_mode():
        batched = valid_mean(*hooks.run(canvas, SIZES, fill=fill))
        alone = torch.cat([valid_mean(*hooks.run(x, [s])) for x, s in zip(images, SIZES)])
    hooks.close()
    return batched, alone


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_a_padded_batch_equals_its_images_alone_and_not_without_the_hooks():
    batched, alone = batch_and_alone(tiny())
    assert relative(batched, alone) < 1e-6
    unfilled, _ = batch_and_alone(tiny(), fill=False)
    assert relative(unfilled, alone) > 1e-2  # the padding does leak without them


def test_one_masked_write_per_layer_gives_the_same_numbers():
    """masks=True (CUDA: few launches) and the strided strips (CPU) fill the same positions."""
    strips, alone = batch_and_alone(tiny())
    masked, _ = batch_and_alone(tiny(), masks=True)
    assert torch.equal(strips, masked) and relative(masked, alone) < 1e-6


def test_squeeze_excitation_averages_the_image_only():
    """A functional mean (timm's SE) escapes the hooks; the probe is what catches such a net."""
    batched, alone = batch_and_alone(tiny(functional_se=True))
    assert relative(batched, alone) > 1e-3

    def forward(net):
        hooks = ExactPadding(net)
        return lambda x, sizes: valid_mean(*hooks.run(x, sizes))

    assert probe(forward(tiny())) < 1e-6
    assert probe(forward(tiny(functional_se=True))) > 1e-3


def test_hooks_do_nothing_outside_run():
    net, x = tiny(), torch.randn(2, 3, 40, 30)
    with torch.inference_mode():
        before = net(x)
        hooks = ExactPadding(net)
        assert torch.equal(net(x), before)
        hooks.close()
        assert torch.equal(net(x), before)


@pytest.mark.parametrize(
    "layer,why",
    [
        (nn.GroupNorm(2, 8), "statistics"),
        (nn.AvgPool2d(3, 2, padding=1, ceil_mode=True), "ceil mode that counts its padding"),
        (nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), "not with zeros"),
        (type("Conv2dSame", (nn.Conv2d,), {})(8, 8, 3), "input's size"),
        (nn.AdaptiveAvgPool2d(2), "splits the canvas"),
    ],
)
def test_layers_the_hooks_cannot_follow_are_refused(layer, why):
    with pytest.raises(Inexact, match=why):
        ExactPadding(nn.Sequential(nn.Conv2d(3, 8, 3), layer))


def test_size_rules_are_the_layers_own():
    with torch.inference_mode():
        layers = [nn.Conv2d(1, 1, 3, 2, 1), nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.AvgPool2d(2)]
        for m in [*layers, nn.Conv2d(1, 1, 4, 4)]:
            for h, w in [(7, 9), (8, 8), (13, 4)]:
                assert size_rule(m)(h, w) == tuple(m(torch.zeros(1, 1, h, w)).shape[2:])
    assert size_rule(nn.Conv2d(1, 1, 3, padding=1)) is None and size_rule(nn.ReLU()) is None
    assert size_rule(nn.AdaptiveAvgPool2d(1))(17, 5) == (1, 1)
    assert mixes(nn.Conv2d(1, 1, 1, stride=2)) and not mixes(nn.Conv2d(1, 1, 1))
    # torch's ceil rule: the last window must start inside the input (or its left padding).
    pool = nn.MaxPool2d(1, 2, ceil_mode=True)
    assert out_size(4, 1, 2, ceil=True) == 2 == layer_out_size(pool, 4, 4)[0] == pool(torch.zeros(1, 1, 4, 4)).shape[2]


def test_randomize_reaches_batchnorm_statistics_and_layer_scales():
    bn, scale = nn.BatchNorm2d(4), nn.Parameter(torch.full((4, 1, 1), 1e-6))
    holder = nn.Module()
    holder.bn, holder.layer_scale = bn, scale
    randomize_(holder)
    assert not torch.equal(bn.running_mean, torch.zeros(4)) and (bn.running_var >= 0.5).all()
    assert scale.abs().min() > 1e-6 and scale.shape == (4, 1, 1)
