"""The dense net is torchvision's VGG: fc6/fc7 as convolutions give the classifier's outputs."""

import pytest
import torch

from featx.net.model import build, torchvision_vgg
from featx.net.weights import Weights


@pytest.mark.parametrize("name", ["vgg16", "vgg11_bn"])
def test_dense_fc7_at_224_equals_torchvision_classifier(name):
    weights = Weights({"kind": "random", "seed": 3}, None)
    vgg = torchvision_vgg(name, weights)
    dense = build(name, weights, "fc7")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = vgg.classifier[:5](torch.flatten(vgg.avgpool(vgg.features(x)), 1))
        got = dense(x)
    assert got.shape == (2, 4096, 1, 1)
    got = got.flatten(1)
    assert expected.abs().max() > 0  # a dead net would prove nothing
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_dense_fc6_and_pool5_shapes_grow_with_the_input():
    weights = Weights({"kind": "random", "seed": 0}, None)
    x = torch.randn(1, 3, 256, 352)
    with torch.inference_mode():
        assert build("vgg11", weights, "pool5")(x).shape == (1, 512, 8, 11)
        assert build("vgg11", weights, "fc6")(x).shape == (1, 4096, 2, 5)


def test_same_seed_same_net_other_seed_other_net():
    a = build("vgg11", Weights({"kind": "random", "seed": 1}, None), "fc6")
    b = build("vgg11", Weights({"kind": "random", "seed": 1}, None), "fc6")
    c = build("vgg11", Weights({"kind": "random", "seed": 2}, None), "fc6")
    assert torch.equal(a.head[0].weight, b.head[0].weight)
    assert not torch.equal(a.head[0].weight, c.head[0].weight)
