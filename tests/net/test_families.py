"""torchvision's convnet families made dense: the descriptor is the model's own pre-logits, padded
mixed-size batches equal one image at a time, the declared taps are the nets', and `featx model`
counts parameters as torchvision does.

Each family is tested on its smallest member (the heavier ones are marked slow). The nets have
random weights with every BatchNorm statistic, bias, norm scale and ConvNeXt layer scale drawn at
random too (featx.net.padding.randomize_): at init they would keep the padding at zero and make
ConvNeXt's blocks near-identities, and an exactness test would pass by accident.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from typer.testing import CliRunner

from featx.cli import app
from featx.extract.config import ExtractConfig
from featx.extract.describer import DenseDescriber
from featx.extract.descriptor import combine
from featx.net.backbones import BACKBONES, get_backbone
from featx.net.padding import randomize_
from featx.net.weights import IMAGENET_MEAN, IMAGENET_STD, Weights

SMALLEST = [
    "resnet18",
    "convnext_tiny",
    "efficientnet_b0",
    "regnet_y_400mf",
    "densenet121",
    "mobilenet_v3_small",
    pytest.param("efficientnet_v2_s", marks=pytest.mark.slow),
    pytest.param("resnext50_32x4d", marks=pytest.mark.slow),
    pytest.param("regnet_x_400mf", marks=pytest.mark.slow),
    pytest.param("mobilenet_v3_large", marks=pytest.mark.slow),
]
CONVNETS = [name for name, b in BACKBONES.items() if b.family != "vgg"]
FAMILIES = {b.family for b in BACKBONES.values()} - {"vgg"}


@pytest.fixture(scope="module")
def nets():
    """name -> (torchvision's model, the dense net with the same randomised weights), built once."""
    built = {}

    def get(name: str):
        if name not in built:
            backbone = get_backbone(name)
            model = randomize_(backbone.torchvision_model(Weights({"kind": "random", "seed": 3}, None)), seed=5)
            dense = backbone.build(Weights({"kind": "file", "file": "randomised"}, model.state_dict()))
            built[name] = (model, dense)
        return built[name]

    return get


def pre_logits(model: nn.Module, family: str, x: torch.Tensor) -> torch.Tensor:
    """torchvision's own forward with the classifier's last Linear removed."""
    model = copy.deepcopy(model)
    if family in ("resnet", "regnet"):
        model.fc = nn.Identity()
    elif family == "densenet":
        model.classifier = nn.Identity()
    else:  # convnext, efficientnet, mobilenet
        model.classifier[-1] = nn.Identity()
    with torch.inference_mode():
        return model(x)


def image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def describer(dense, flip: bool = False) -> DenseDescriber:
    return DenseDescriber(dense, IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"), "fp32", flip=flip)


def normalised(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


@pytest.mark.parametrize("name", SMALLEST)
def test_descriptor_at_224_is_the_models_own_pre_logits(nets, name):
    """At 224x224 without flip, one scale: L2(torchvision's forward up to its last Linear)."""
    model, dense = nets(name)
    images = [image(224, 224, seed) for seed in (0, 1)]
    ours = combine([describer(dense)(images)], "mean")
    theirs = F.normalize(pre_logits(model, get_backbone(name).family, normalised(torch.stack(images))), dim=1)
    assert ours.shape == (2, get_backbone(name).tap("pre_logits").channels)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SMALLEST)
def test_a_mixed_batch_equals_one_image_at_a_time(nets, name):
    """Padded mixed sizes and their flips (each top-left) equal each image alone; without the hooks
    (rezero=False) they do not, so the hooks are what makes them equal."""
    _, dense = nets(name)
    d = describer(dense, flip=True)
    images = [image(h, w, seed) for seed, (h, w) in enumerate([(64, 93), (81, 64), (70, 70), (81, 93)])]
    alone = torch.cat([d([x]) for x in images])
    batched = d(images)
    scale = alone.abs().max()
    assert (batched - alone).abs().max() <= 1e-5 * scale
    unhooked = d.run(d.stage(images), rezero=False).cpu()
    assert (unhooked - alone).abs().max() > 1e-4 * scale


def test_cudas_masked_fill_gives_the_same_numbers(nets):
    """The masks path (one masked write per layer, what lower() picks on CUDA) equals the strips."""
    _, dense = nets("mobilenet_v3_small")
    d = describer(dense)
    images = [image(h, w, seed) for seed, (h, w) in enumerate([(64, 93), (81, 64)])]
    strips = d(images)
    dense.padding.masks = True
    try:
        assert torch.equal(d(images), strips)
    finally:
        dense.padding.masks = False


def test_an_intermediate_tap_is_that_stages_map_averaged(nets):
    model, _ = nets("resnet18")
    dense = get_backbone("resnet18").build(Weights({"kind": "file"}, model.state_dict()), "layer3")
    x = normalised(image(96, 128, 0)[None])
    with torch.inference_mode():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        expected = model.layer3(model.layer2(model.layer1(stem))).mean(dim=(2, 3))
        torch.testing.assert_close(dense.forward_pooled(x), expected, rtol=1e-5, atol=1e-6)
    assert dense.channels == 256 == ExtractConfig(model="resnet18", layer="layer3").dim


def check_declaration(name: str) -> None:
    """The registry's taps (channels, stride, least scale) are what the net gives, on the meta device."""
    backbone = get_backbone(name)
    for tap in backbone.taps:
        rows = backbone.summary(1024, 1024, tap.name)["rows"]
        mean = next(i for i, r in enumerate(rows) if r.name == "mean")
        assert rows[-1].shape == (tap.channels,), (name, tap)
        assert rows[mean - 1].shape[1:] == (1024 // tap.stride, 1024 // tap.stride), (name, tap)
        backbone.summary(tap.min_scale, tap.min_scale, tap.name)  # one position at the least scale
        if tap.min_scale > 1:
            with pytest.raises(ValueError, match="--size"):
                backbone.summary(tap.min_scale - 1, tap.min_scale - 1, tap.name)


def check_parameters(name: str) -> None:
    s = get_backbone(name).summary()
    torchvisions = torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
    assert s["params"] + s["classifier_params"] == s["reference_params"] == torchvisions


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_familys_first_member_is_declared_as_built_and_counted_as_torchvision(family):
    name = next(n for n in CONVNETS if get_backbone(n).family == family)
    check_declaration(name)
    check_parameters(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONVNETS)
def test_every_convnet_is_declared_as_built_and_counted_as_torchvision(name):
    check_declaration(name)
    check_parameters(name)


def test_model_command_counts_parameters_as_torchvision():
    runner = CliRunner()
    for name, total in [("resnet50", "25,557,032"), ("convnext_tiny", "28,589,128")]:
        result = runner.invoke(app, ["model", name])
        assert result.exit_code == 0, result.output
        assert f"torchvision counts {total} parameters" in result.output
        assert "pre_logits (default)" in result.output
    out = runner.invoke(app, ["model", "resnet50", "--size", "256x341"]).output
    assert "layer4.2" in out and "2048x8x11" in out and "8.17" not in out
    bad = runner.invoke(app, ["model", "resnet50", "--layer", "fc7"])
    assert bad.exit_code == 2 and bad.output.strip().endswith("choose one of layer1, layer2, layer3, pre_logits")
    assert bad.output.count("\n") == 1
    small = runner.invoke(app, ["model", "convnext_tiny", "--size", "31x40"])
    assert small.exit_code == 2 and "--size 31x40" in small.output and small.output.count("\n") == 1


def test_weights_that_do_not_fit_the_net_are_refused_in_one_line(tmp_path):
    file = tmp_path / "resnet18.pth"
    torch.save(
        get_backbone("resnet18").torchvision_model(Weights({"kind": "random", "seed": 0}, None)).state_dict(), file
    )
    from featx.extract.describer import make_describer

    with pytest.raises(
        ValueError,
        match=r"^weights=resnet18.pth does not fit resnet34: .* differ \(.*\); give model=NAME of the net they",
    ):
        make_describer(ExtractConfig(model="resnet34", weights=str(file), precision="fp32"), "cpu")
    from featx.extract.provenance import descriptor_hash

    with pytest.raises(ValueError, match=r"^unknown --weights 'IMAGENET1K_V2' for densenet121; use 'default', one of"):
        descriptor_hash(ExtractConfig(model="densenet121", weights="IMAGENET1K_V2"))
