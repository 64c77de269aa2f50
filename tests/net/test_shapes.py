"""featx.net.shapes: the one output-size rule (layer tables, dense nets, the plan) is torch's own."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from featx.net.plan.steps import Conv, Pool
from featx.net.shapes import layer_out_size, out_size, spoils_padding, zero_outside

LAYERS = [
    nn.Conv2d(2, 3, 3, padding=1),
    nn.Conv2d(2, 3, 7),
    nn.Conv2d(2, 3, (3, 5), stride=(2, 3), padding=(1, 2), dilation=(2, 1)),
    nn.MaxPool2d(2, 2),
    nn.MaxPool2d(3, 2, ceil_mode=True),
    nn.MaxPool2d(3, 2, padding=1, dilation=1),
    nn.MaxPool2d((2, 3), (1, 2), ceil_mode=True),
]


@pytest.mark.parametrize("m", LAYERS, ids=lambda m: type(m).__name__ + str(LAYERS.index(m)))
def test_layer_out_size_is_what_torch_gives(m):
    with torch.inference_mode():
        for h, w in itertools.product((7, 8, 13, 32), (9, 16, 31)):
            assert layer_out_size(m, h, w) == tuple(m(torch.zeros(1, 2, h, w)).shape[2:]), (h, w)


def test_the_plans_steps_use_the_same_rule():
    conv = Conv(torch.zeros(3, 2, 3, 5), torch.zeros(3), (3, 5), [1, 2], [2, 3], [2, 1], 1, True, False)
    assert conv.out_size(13, 31) == layer_out_size(LAYERS[2], 13, 31)
    assert Pool(3, 2, 0, 1, True).out_size(13, 31) == layer_out_size(LAYERS[4], 13, 31)
    assert out_size(224, 7) == 218 and out_size(7, 2, 2, ceil=True) == 4


def test_sizeless_layers_and_what_spoils_the_padding():
    assert layer_out_size(nn.ReLU(), 5, 6) is None and layer_out_size(nn.BatchNorm2d(2), 5, 6) is None
    assert spoils_padding(nn.BatchNorm2d(2)) and spoils_padding(nn.Conv2d(1, 1, 1))
    assert not spoils_padding(nn.ReLU()) and not spoils_padding(nn.Identity())


def test_zero_outside_clears_only_the_padding():
    x = torch.ones(3, 2, 5, 6)
    zero_outside(x, [(5, 6), (3, 4), (3, 4)])
    assert x[0].sum() == 2 * 30
    assert x[1, :, :3, :4].sum() == x[1].sum() == 2 * 12 and torch.equal(x[1], x[2])
