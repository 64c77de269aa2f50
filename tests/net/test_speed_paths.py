"""The fast paths give the plain module's features: pre-packed oneDNN ops, plain kernels (the
ones CUDA runs), bf16, chunked head, any batch size. Tiny images and random vgg11; no timing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import featx
from featx.cli import app
from featx.extract.config import ExtractConfig, descriptor_settings
from featx.extract.describer import DenseDescriber
from featx.net.backbones.vgg import DenseVGG, build
from featx.net.device import resolve_precision
from featx.net.plan import onednn_prepack_works
from featx.net.plan.steps import max_pool_2x2
from featx.net.weights import IMAGENET_MEAN, IMAGENET_STD, Weights
from tests.conftest import smooth_image, write_images

CPU = torch.device("cpu")
RANDOM = Weights({"kind": "random", "seed": 0}, None)


def images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack(
        [torch.from_numpy(np.array(smooth_image(rng, width, height))).permute(2, 0, 1) for _ in range(n)]
    )


def tiny_net(layer: str = "fc7", bn: bool = False, seed: int = 0) -> DenseVGG:
    """A DenseVGG in miniature (stride 4, fc6 a 7x7 conv, fc7 1x1): the plan's logic in milliseconds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        norm = [nn.BatchNorm2d(8)] if bn else []
        trunk = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            *norm,
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
        )
        head = [nn.Conv2d(16, 32, 7), nn.ReLU(inplace=True), nn.Conv2d(32, 24, 1), nn.ReLU(inplace=True)]
        if bn:  # running statistics and affine far from identity, so folding them is tested
            norm[0].running_mean.uniform_(-0.5, 0.5), norm[0].running_var.uniform_(0.5, 2.0)
            norm[0].weight.data.uniform_(0.5, 1.5), norm[0].bias.data.uniform_(-0.2, 0.2)
    return DenseVGG(trunk, nn.Sequential(*head[: {"fc7": 4, "fc6": 2, "pool5": 0}[layer]])).eval()


def module_reference(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The DenseVGG module itself, fp32, NCHW: mean map, flip-averaged."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    with torch.inference_mode():
        v = (x.float() - mean) / std
        return (net(v).mean(dim=(2, 3)) + net(v.flip(-1)).mean(dim=(2, 3))) / 2


def describer(net: nn.Module, precision: str, **kw) -> DenseDescriber:
    # A copy: DenseDescriber moves the net to its precision in place.
    return DenseDescriber(copy.deepcopy(net), IMAGENET_MEAN, IMAGENET_STD, CPU, precision, True, **kw)


def centred_cosines(fast: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    m = exact.double().mean(0, keepdim=True)
    return torch.nn.functional.cosine_similarity(fast.double() - m, exact.double() - m, dim=1)


def assert_rel_close(got: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    assert expected.abs().max() > 0  # a dead net would prove nothing
    err = (got - expected).abs().max() / expected.abs().max()
    assert err < rel, f"relative error {err:.2e} >= {rel:.0e}"


# -- the real architecture: random vgg11 on 224 x 288 images --------------------------------
@pytest.fixture(scope="module")
def vgg11():
    return build("vgg11", RANDOM, "fc7")


@pytest.fixture(scope="module")
def dense_images():
    # 224 x 288: pool5 is 7 x 9, so fc6 has 1 x 3 positions (the position mean matters).
    return images(4, 224, 288)


@pytest.fixture(scope="module")
def dense_reference(vgg11, dense_images):
    return module_reference(vgg11, dense_images)


@pytest.mark.parametrize("prepack", [True, False], ids=["prepacked", "plain-kernels"])
def test_vgg11_fp32_fast_path_equals_the_module(vgg11, dense_images, dense_reference, prepack):
    d = describer(vgg11, "fp32", prepack=prepack)
    assert d.prepacked == (prepack and onednn_prepack_works(torch.float32))
    assert_rel_close(d(dense_images), dense_reference, 1e-5)


def test_vgg11_reference_forward_equals_the_module(vgg11, dense_images, dense_reference):
    # What the Plan lowers: forward_features, then forward_head averaged over valid positions.
    d = describer(vgg11, "fp32", lower=False)
    assert d.plan == d.net.forward_pooled
    assert_rel_close(d(dense_images), dense_reference, 1e-5)


def test_vgg11_bf16_keeps_the_centred_cosine_to_exact_fp32(vgg11, dense_images, dense_reference):
    fast = describer(vgg11, "bf16")(dense_images)
    assert fast.dtype == torch.float32 and fast.shape == dense_reference.shape
    cos = centred_cosines(fast, dense_reference)
    assert cos.min() >= 0.995, cos
    # ... and the check can fail: another image's exact descriptor is far off.
    assert centred_cosines(fast.roll(1, 0), dense_reference).max() < 0.9


# -- the plan's logic on a miniature DenseVGG ------------------------------------------------
@pytest.mark.parametrize("layer", ["fc7", "fc6", "pool5"])
@pytest.mark.parametrize("bn", [False, True], ids=["conv", "conv-bn"])
@pytest.mark.parametrize("prepack", [True, False], ids=["prepacked", "plain-kernels"])
def test_fp32_paths_equal_the_module(layer, bn, prepack):
    net, x = tiny_net(layer, bn), images(3, 40, 52, seed=1)
    assert_rel_close(describer(net, "fp32", prepack=prepack)(x), module_reference(net, x), 1e-5)


@pytest.mark.parametrize("prepack", [True, False], ids=["prepacked", "plain-kernels"])
def test_bf16_paths_keep_the_centred_cosine(prepack):
    net, x = tiny_net(), images(8, 40, 52, seed=3)
    assert centred_cosines(describer(net, "bf16", prepack=prepack)(x), module_reference(net, x)).min() >= 0.995


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_features_do_not_depend_on_batch_size(precision):
    net, x = tiny_net(), images(5, 40, 52, seed=2)
    d = describer(net, precision)
    whole = d(x)
    one_by_one = torch.cat([d(x[i : i + 1]) for i in range(len(x))])
    split = torch.cat([d(x[:2]), d(x[2:])])
    tol = 1e-6 if precision == "fp32" else 1e-3
    assert_rel_close(one_by_one, whole, tol)
    assert_rel_close(split, whole, tol)


@pytest.mark.parametrize("prepack", [True, False], ids=["prepacked", "plain-kernels"])
def test_chunked_head_and_small_trunk_passes_change_nothing(prepack):
    # 40 x 52 -> pool5 10 x 13 -> fc6 4 x 7 positions; head_rows=5 splits an image's rows
    # over chunks and packs pieces of two images into one; pass_pixels=1: one image per pass.
    net, x = tiny_net(), images(3, 40, 52, seed=4)
    whole = describer(net, "fp32", prepack=prepack)(x)
    assert_rel_close(describer(net, "fp32", prepack=prepack, head_rows=5, pass_pixels=1)(x), whole, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_pool_2x2_equals_torch_on_odd_sizes(dtype):
    x = torch.randn(2, 5, 11, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    assert torch.equal(max_pool_2x2(x), F.max_pool2d(x, 2, 2))


def test_flop_counter_counts_every_conv_of_the_shape_run():
    net = tiny_net(bn=True)
    counted = []

    def hook(m, inputs, out):
        counted.append(2 * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] * out.numel())

    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.inference_mode():
        net(torch.zeros(1, 3, 45, 61))
    assert net.flops(45, 61) == sum(counted) > 0
    # VGG16 at 224 x 224 up to fc7: 15.47 G multiply-adds (the well-known 15.5 GMAC).
    with torch.device("meta"):
        vgg16 = build("vgg16", RANDOM, "fc7")
    assert vgg16.flops(224, 224) == 30_932_336_640


def test_auto_precision_is_resolved_per_device_and_hashed_resolved():
    resolved = resolve_precision("auto", "cpu")
    assert resolved in ("bf16", "fp32")
    assert resolve_precision("auto", CPU) == resolved
    auto = ExtractConfig(model="vgg11", weights="random", device="cpu")
    assert auto.precision == "auto" and descriptor_settings(auto, {}, {})["precision"] == resolved
    assert featx.descriptor_hash(auto) == featx.descriptor_hash(auto.replace(precision=resolved))
    other = "fp32" if resolved == "bf16" else "bf16"
    assert featx.descriptor_hash(auto) != featx.descriptor_hash(auto.replace(precision=other))
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", CPU)
    with pytest.raises(ValueError, match="device"):
        resolve_precision("auto", "tpu")


def test_metadata_records_resolved_precision_and_bucket(tmp_path):
    write_images(tmp_path / "in", [(70, 50), (90, 60)])
    out = tmp_path / "f.parquet"
    result = CliRunner().invoke(
        app,
        [
            "extract",
            str(tmp_path / "in"),
            "-o",
            str(out),
            "--model",
            "vgg11",
            "--weights",
            "random",
            "--layer",
            "pool5",
            "--scales",
            "32",
            "--bucket",
            "16",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    meta = featx.read_provenance(out)
    assert meta["precision"] == meta["settings"]["precision"] == resolve_precision("auto", "cpu")
    assert meta["bucket"] == meta["settings"]["bucket"] == 16


def test_auto_precision_is_fp32_when_onednn_is_capped_below_bf16():
    """ONEDNN_MAX_CPU_ISA=AVX2 emulates an AVX2-only CPU: "auto" must then mean fp32 there too."""
    import os
    import subprocess
    import sys

    code = "from featx.net.device import resolve_precision; print(resolve_precision('auto', 'cpu'))"
    for isa, expected in [("AVX2", "fp32"), ("AVX512_CORE", "fp32")]:
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ | {"ONEDNN_MAX_CPU_ISA": isa},
        )
        assert out.stdout.strip() == expected, out.stderr
