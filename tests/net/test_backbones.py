"""The backbone registry: one list of names and taps, declarations that match the nets, and
refusals of unknown names and taps in one line before torch loads (the convnet families'
declarations are checked against their nets in test_families.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from featx.extract.config import MODELS, ExtractConfig
from featx.net.backbones import BACKBONES, NAMES, TAP_NAMES, get_backbone
from featx.net.weights import Weights, identify

VGG = ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")


def test_names_and_taps_are_one_list_each():
    assert NAMES[: len(VGG)] == VGG and NAMES == MODELS
    assert TAP_NAMES[:3] == ("pool5", "fc6", "fc7")  # in order from the input, as every backbone lists them
    families = {}
    for name, b in BACKBONES.items():
        assert b.name == name and b.default_tap == b.taps[-1].name  # the last map before the classifier
        assert b.default_tap == ("fc7" if b.family == "vgg" else "pre_logits")
        assert set(b.tap_names) <= set(TAP_NAMES)
        families.setdefault(b.family, []).append(name)
    assert families["vgg"] == list(VGG) and all(BACKBONES[n].tap_names == ("pool5", "fc6", "fc7") for n in VGG)
    assert set(families) == {"vgg", "resnet", "convnext", "efficientnet", "regnet", "densenet", "mobilenet"}
    assert {"resnet18", "resnet152", "resnext50_32x4d", "wide_resnet50_2", "efficientnet_v2_s"} <= set(NAMES)


def test_the_default_layer_is_each_backbones_default_tap():
    assert ExtractConfig().layer == "fc7" and ExtractConfig(model="resnet50").layer == "pre_logits"
    assert ExtractConfig(model="resnet50").dim == 2048
    assert ExtractConfig(model="convnext_tiny", layer="features.5").dim == 384
    # A layer that was the model's default follows a new model; one given explicitly does not.
    assert ExtractConfig().replace(model="densenet121").layer == "pre_logits"
    assert ExtractConfig(model="resnet50").replace(model="vgg19").layer == "fc7"
    with pytest.raises(ValueError, match="unknown --layer 'fc6' for resnet50"):
        ExtractConfig(layer="fc6").replace(model="resnet50")


@pytest.mark.parametrize("name", ["vgg11", "vgg16_bn"])
def test_declared_taps_are_what_the_net_gives(name):
    backbone = get_backbone(name)
    with torch.device("meta"):
        net = backbone.build(Weights({"kind": "random", "seed": 0}, None))
    for tap in backbone.taps:
        dense = net.up_to(tap.name)
        assert dense.channels == tap.channels == ExtractConfig(model=name, layer=tap.name, scales=(512,)).dim
        # Stride: pool5 (under every tap) is 1/stride of the input, floored at each pool.
        assert dense.trunk_size(32 * 11, 32 * 13 + 31) == (11, 13)
        # The least scale gives the tap one position; one pixel less gives none (and is refused).
        rows = backbone.summary(tap.min_scale, tap.min_scale, tap.name)["rows"]
        assert rows[-1].shape[1:] == (1, 1), tap
        with pytest.raises(ValueError, match="smaller than"):
            backbone.summary(tap.min_scale - 1, tap.min_scale - 1, tap.name)


def test_a_tap_is_looked_up_or_refused_by_its_backbone():
    vgg16 = get_backbone("vgg16")
    assert vgg16.tap("pool5").channels == 512 and vgg16.tap("fc7").min_scale == 224
    with pytest.raises(ValueError, match=r"^unknown --layer 'fc8' for vgg16; choose one of pool5, fc6, fc7$"):
        vgg16.tap("fc8")
    with pytest.raises(ValueError, match=r"^unknown --model 'resnet5'; choose one of vgg11, .*, or timm:NAME for"):
        get_backbone("resnet5")
    with pytest.raises(ValueError, match="unknown --model 'timm:'"):
        get_backbone("timm:")
    assert get_backbone("timm:vit_small_patch14_dinov2.lvd142m").family == "timm"


def test_weights_come_from_torchvisions_registry_of_the_backbone():
    import torchvision

    assert get_backbone("vgg16_bn").weights_enum() is torchvision.models.VGG16_BN_Weights
    assert identify("vgg16", "default")["name"] == "VGG16_Weights.IMAGENET1K_V1"  # the paper-era weights
    assert identify("resnet50", "default")["name"] == "ResNet50_Weights.IMAGENET1K_V2"  # the enum's DEFAULT
    assert identify("resnet50", "IMAGENET1K_V1")["name"] == "ResNet50_Weights.IMAGENET1K_V1"
    with pytest.raises(ValueError, match=r"^unknown --weights 'IMAGENET1K_V9' for convnext_tiny; use 'default'"):
        identify("convnext_tiny", "IMAGENET1K_V9")
    assert identify("vgg19", "VGG19_Weights.IMAGENET1K_V1")["url"].endswith(".pth")
    with pytest.raises(ValueError, match=r"unknown --weights 'V9' for vgg16; use 'default', one of IMAGENET1K_V1"):
        identify("vgg16", "V9")


PROBE = """
import json, sys
from featx.extract.config import ExtractConfig
errors = []
for kw in {cases}:
    try:
        ExtractConfig(**kw)
    except ValueError as e:
        errors.append(str(e))
print(json.dumps([errors, "torch" in sys.modules]))
"""


def test_unknown_names_and_taps_are_refused_in_one_line_before_torch_loads():
    cases = [
        {"model": "resnet5"},
        {"layer": "fc8"},
        {"model": "vgg11_bn", "layer": "conv5_3"},
        {"layer": "fc6", "scales": (223,)},
        {"layer": "pool5", "scales": (31,)},
        {"precision": "fp8"},
        {"model": "resnet50", "layer": "fc7"},
        {"model": "convnext_tiny", "scales": (31, 256)},
        {"model": "timm:vit_small_patch16_224", "layer": "fc7"},
        {"model": "timm:two words"},
    ]
    code = PROBE.replace("{cases}", repr(cases))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    errors, torch_loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not torch_loaded, errors
    assert [e.count("\n") for e in errors] == [0] * len(cases), errors
    assert errors[0].startswith("unknown --model 'resnet5'; choose one of vgg11")
    assert errors[1] == "unknown --layer 'fc8' for vgg16; choose one of pool5, fc6, fc7"
    assert errors[2] == "unknown --layer 'conv5_3' for vgg11_bn; choose one of pool5, fc6, fc7"
    assert errors[3].startswith("--scales 223 is below 224: fc6 needs")
    assert errors[4].startswith("--scales 31 is below 32: pool5 needs")
    assert errors[5] == "unknown --precision 'fp8'; choose one of auto, fp32, bf16, fp16"
    assert errors[6] == "unknown --layer 'fc7' for resnet50; choose one of layer1, layer2, layer3, pre_logits"
    assert errors[7].startswith("--scales 31 is below 32: pre_logits needs")
    assert errors[8] == "unknown --layer 'fc7' for timm:vit_small_patch16_224; choose one of pre_logits, cls"
    assert errors[9].startswith("unknown --model 'timm:two words'")


def test_torchvision_convnets_and_timm_names_are_accepted_before_torch_loads():
    code = (
        "import json, sys; from featx.extract.config import ExtractConfig as C; "
        "a = C(model='efficientnet_b0', scales=(224,)); b = C(model='timm:vit_small_patch16_224', layer='cls'); "
        "print(json.dumps([a.layer, a.dim, b.layer, 'torch' in sys.modules]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["pre_logits", 1280, "cls", False], proc.stderr


def test_the_probe_sees_torch_when_a_net_is_built():
    """The check above can fail: building a net does import torch."""
    code = "import sys; from featx.net.backbones import get_backbone; get_backbone('vgg11').module(); "
    code += "print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr


def test_vggs_settings_hashes_are_what_they_were_before_other_backbones_joined():
    """Feature files and cache entries made before the backbone seam stay valid (hashes recorded then)."""
    from featx.extract.provenance import descriptor_hash

    assert descriptor_hash(ExtractConfig(precision="fp32")) == "31b25c1f9d17abc2"
    assert (
        descriptor_hash(ExtractConfig(model="vgg19", weights="random", layer="pool5", scales=(32,), precision="fp32"))
        == "8a4dbbbd10700fc0"
    )
    config = ExtractConfig(model="vgg16_bn", layer="fc6", aggregate="stack", precision="bf16", flip=False)
    assert descriptor_hash(config) == "935766e4eba057cc"


def test_a_family_declares_its_layout_and_the_provenance_says_which_ran():
    """ConvNeXt runs NCHW in fp32 on a CPU (its own declaration), channels-last otherwise; other families always."""
    cpu = torch.device("cpu")
    for name, dtype, layout in [
        ("convnext_tiny", torch.float32, torch.contiguous_format),
        ("convnext_tiny", torch.bfloat16, torch.channels_last),
        ("resnet18", torch.float32, torch.channels_last),
    ]:
        backbone = get_backbone(name)
        said = "NCHW" if layout is torch.contiguous_format else "channels-last"
        assert f", {said}, " in backbone.kernels(cpu, dtype)
        net = backbone.build(Weights({"kind": "random", "seed": 0}, None), backbone.taps[0].name)
        net.lower(cpu, dtype)
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=layout), (name, dtype)
