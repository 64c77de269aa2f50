"""The dense net is torchvision's VGG: fc6/fc7 as convolutions give the classifier's outputs."""

import pytest
import torch
from typer.testing import CliRunner

from featx.cli import app
from featx.net.backbones import VGG_NAMES, get_backbone
from featx.net.backbones.vgg import build, layer_table, model_summary, torchvision_model, vgg_module
from featx.net.weights import Weights


@pytest.mark.parametrize("name", ["vgg16", "vgg11_bn"])
def test_dense_fc7_at_224_equals_torchvision_classifier(name):
    weights = Weights({"kind": "random", "seed": 3}, None)
    backbone = get_backbone(name)  # through the registry, as the describer builds it
    vgg = backbone.torchvision_model(weights)
    dense = backbone.build(weights)  # the default tap: fc7
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = vgg.classifier[:5](torch.flatten(vgg.avgpool(vgg.features(x)), 1))
        got = dense(x)
        pooled = dense.forward_pooled(x)
    assert got.shape == (2, 4096, 1, 1)
    got = got.flatten(1)
    assert expected.abs().max() > 0  # a dead net would prove nothing
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


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


def test_forward_features_then_head_is_the_classifier_and_layers_are_methods():
    weights = Weights({"kind": "random", "seed": 4}, None)
    vgg, dense = torchvision_model("vgg11", weights), build("vgg11", weights, "fc7")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        pool5 = dense.forward_features(x)
        fc7 = dense.forward_head(pool5)
        fc6 = dense.up_to("fc6").forward_head(pool5)
        flat = torch.flatten(vgg.avgpool(vgg.features(x)), 1)
        torch.testing.assert_close(fc7, vgg.classifier[:5](flat), rtol=1e-5, atol=1e-5 * fc7.abs().max().item())
        torch.testing.assert_close(fc6, vgg.classifier[:2](flat), rtol=1e-5, atol=1e-5 * fc6.abs().max().item())
        assert dense.up_to("pool5").forward_head(pool5).shape == (2, 512)
    assert (dense.layer, dense.up_to("fc6").layer, dense.up_to("pool5").layer) == ("fc7", "fc6", "pool5")
    assert dense.up_to("fc6").head[0] is dense.head[0]  # the same weights, not a copy
    with pytest.raises(ValueError, match="ends at fc6"):
        dense.up_to("fc6").up_to("fc7")


@pytest.mark.parametrize("name,total", [("vgg16", 138_357_544), ("vgg19", 143_667_240), ("vgg11", 132_863_336)])
def test_parameter_totals_are_torchvisions(name, total):
    s = model_summary(name)
    assert s["reference_params"] == total
    assert s["params"] + s["classifier_params"] == total  # the dense net to fc7, plus fc8
    assert s["classifier_params"] == 4096 * 1000 + 1000


def test_layer_table_rows_checked_by_hand():
    rows = {r.name: r for r in model_summary("vgg16", 256, 341, "fc7")["rows"]}
    # conv1_2: 64 -> 64 channels, 3x3, padding 1: shape kept; 64*64*9 + 64 parameters.
    assert rows["conv1_2"].shape == (64, 256, 341)
    assert rows["conv1_2"].params == 36_928
    assert rows["conv1_2"].flops == 2 * 64 * 9 * 64 * 256 * 341
    # Five floor pools: 256 -> 8, 341 -> 170 -> 85 -> 42 -> 21 -> 10; fc6 (7x7) then has 2x4 positions.
    assert rows["pool5"].shape == (512, 8, 10)
    assert rows["fc6"].shape == (4096, 2, 4)
    assert rows["fc6"].flops == 2 * 512 * 49 * 4096 * 8 and rows["fc6"].params == 512 * 49 * 4096 + 4096
    # The well-known 15.5 G multiply-adds of VGG16 at 224x224.
    assert model_summary("vgg16")["flops"] == 30_932_336_640


def test_flops_method_is_the_layer_tables_sum():
    with torch.device("meta"):
        net = build("vgg13", Weights({"kind": "random", "seed": 0}, None), "fc6")
    assert net.flops(230, 300) == sum(r.flops for r in layer_table(net, 230, 300)) > 0


def test_model_command_prints_the_table():
    result = CliRunner().invoke(app, ["model", "vgg16", "--size", "256x341"])
    assert result.exit_code == 0, result.output
    assert "conv1_2" in result.output and "4096x2x4" in result.output
    assert "134,260,544 parameters" in result.output and "138,357,544" in result.output
    bad = CliRunner().invoke(app, ["model", "vgg16", "--size", "100x100"])
    assert bad.exit_code == 2 and "7x7" in bad.output


@pytest.mark.parametrize(
    "name", [n if n in ("vgg11", "vgg11_bn") else pytest.param(n, marks=pytest.mark.slow) for n in VGG_NAMES]
)
def test_featx_builds_torchvisions_vgg_module_for_module(name):
    """featx builds VGG without importing torchvision (1.2 s of start-up): the same tensors under
    the same names, and a seeded random init gives torchvision's numbers exactly."""
    weights = Weights({"kind": "random", "seed": 7}, None)
    ours, theirs = vgg_module(name, weights), torchvision_model(name, weights)
    assert [type(m) for m in ours.modules()][1:] == [type(m) for m in theirs.modules()][1:]
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
