"""bf16 is as faithful to fp32 as oneDNN's direct bf16 convolution (what OpenVINO's bf16 runs):
per Winograd layer on the maps a ReLU leaves, and for the descriptor of a whole VGG16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featx.extract.decode import decode
from featx.extract.describer import DenseDescriber
from featx.net.backbones import get_backbone
from featx.net.plan import onednn_prepack_works, winograd
from featx.net.weights import IMAGENET_MEAN, IMAGENET_STD, Weights
from tests.net.test_speed_paths import images, tiny_net

CPU = torch.device("cpu")
BF16 = onednn_prepack_works(torch.bfloat16)
needs_bf16 = pytest.mark.skipif(not BF16, reason="no native bf16 on this CPU: the plan runs fp32")


def relu_maps(c: int, seed: int) -> torch.Tensor:
    """Non-negative, spatially smooth maps, as a ReLU leaves them (where F(2x2)'s middle product is largest)."""
    g = torch.Generator().manual_seed(seed)
    x = F.relu(F.avg_pool2d(torch.randn(2, c, 30, 26, generator=g), 7, stride=1) + 0.1)
    return x.bfloat16().contiguous(memory_format=torch.channels_last)


def rel_l2(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected).norm() / expected.norm())


@needs_bf16
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch-ops"])
@pytest.mark.parametrize("c,seed", [(64, 0), (128, 1), (64, 2)])
def test_a_bf16_winograd_layer_errs_no_more_than_the_direct_bf16_conv(c, seed, compiled):
    # All 16 products in bf16, F(2x2) erred ~1.5x direct bf16 here (0.0035 against 0.0024 relative
    # L2); its middle product in fp32 brings it below (compiled, 0.0022), and the torch-op
    # transforms, which round every intermediate sum, within 1.2x.
    x = relu_maps(c, seed)
    g = torch.Generator().manual_seed(seed + 10)
    weight, bias = torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5), torch.randn(c, generator=g) * 0.1
    exact = F.conv2d(x.float(), weight, bias, padding=1)
    direct = F.conv2d(x, weight.bfloat16(), bias.bfloat16(), padding=1)
    u = winograd.transform_weight(weight, winograd.F2)
    with torch.inference_mode():
        y = winograd.conv3x3(
            x,
            winograd.gemm_weights(u, torch.bfloat16, winograd.F2, packed=True),
            bias,
            False,
            winograd.Workspace(),
            winograd.F2,
            compiled=compiled,
        )
    assert y.dtype == torch.bfloat16
    assert rel_l2(y, exact) <= rel_l2(direct, exact) * (1.0 if compiled else 1.2)


@needs_bf16
def test_the_middle_product_is_fp32_and_the_rest_bf16():
    u = winograd.transform_weight(torch.randn(8, 4, 3, 3), winograd.F2)
    dtypes = [w.dtype for w in winograd.gemm_weights(u, torch.bfloat16, winograd.F2, packed=False)]
    assert dtypes == [torch.float32 if a == 5 else torch.bfloat16 for a in range(16)]
    assert winograd.wide_components(winograd.F2, torch.float32) == ()  # fp32 runs as before


@needs_bf16
def test_describers_leave_the_net_as_built_and_agree():
    # Each describer lowers the net from its own (fp32) numbers: a second describer of the same
    # net gives the first one's numbers, whatever ran before.
    net, x = tiny_net(), images(3, 40, 52, seed=5)
    weights = [p.clone() for p in net.parameters()]
    first = DenseDescriber(net, IMAGENET_MEAN, IMAGENET_STD, CPU, "bf16", True)(x)
    second = DenseDescriber(net, IMAGENET_MEAN, IMAGENET_STD, CPU, "bf16", True)(x)
    assert torch.equal(first, second)
    assert all(p.dtype == torch.float32 and torch.equal(p, w) for p, w in zip(net.parameters(), weights))


def centred_cosines(fast: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per row: cosine of (fast - m) and (exact - m), m = the mean exact row (as benchmarks/extract.py)."""
    m = exact.mean(axis=0, keepdims=True)
    a, b = fast - m, exact - m
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
@needs_bf16
def test_vgg16_bf16_descriptor_is_as_close_to_fp32_as_direct_bf16(samples):
    # VGG16 (random, seed 0), the repo's 12 sample images at Q=224, fc7, no flip. Measured:
    # minimum centred cosine to fp32 0.99837 before (all Winograd products bf16, kernels
    # transformed from bf16-rounded weights), 0.99946 now; oneDNN's direct bf16 convs 0.99917.
    net = get_backbone("vgg16").build(Weights({"kind": "random", "seed": 0}, None), "fc7")
    pixels = [decode(f, (224,), 1 << 30).scaled[224][None] for f in sorted(samples.rglob("*.jpg"))]

    def run(precision: str, **plan) -> np.ndarray:
        d = DenseDescriber(net, IMAGENET_MEAN, IMAGENET_STD, CPU, precision, False)
        if plan:
            d.plan = net.lower(CPU, d.dtype, **plan)
        return torch.cat([d(p) for p in pixels]).double().numpy()

    exact = run("fp32")  # F(4x4) Winograd in fp32: within 1e-5 of direct fp32
    bf16 = centred_cosines(run("bf16"), exact)
    direct = centred_cosines(run("bf16", fast_conv=False), exact)
    assert bf16.min() >= 0.9993
    assert bf16.min() >= direct.min() and np.median(bf16) >= np.median(direct)
