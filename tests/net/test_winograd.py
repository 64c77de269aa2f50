"""Winograd F(2x2, 3x3) and F(4x4, 3x3) give the direct convolution's numbers: any size (odd,
tiny, one row), with and without ReLU, with oneDNN's packed GEMMs and torch.bmm, transforms by
torch ops and compiled, in bands, with a reused workspace, inside a zero-padded mixed batch,
and inside the plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featx.net.plan import Plan, onednn_prepack_works, winograd
from featx.net.plan.steps import WinogradConv

PACKED = onednn_prepack_works(torch.float32)


def case(n: int, c: int, k: int, h: int, w: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c**0.5)
    bias = torch.randn(k, generator=g) * 0.1
    return x, weight, bias


def direct(x, weight, bias, relu):
    y = F.conv2d(x.float(), weight, bias, padding=1)
    return F.relu(y) if relu else y


def winograd_conv(x, weight, bias, relu, packed: bool, workspace=None, algorithm=winograd.F2, compiled=True):
    u = winograd.transform_weight(weight, algorithm)
    return winograd.conv3x3(
        x,
        winograd.gemm_weights(u, x.dtype, algorithm, packed),
        bias.to(x.dtype),
        relu,
        workspace or winograd.Workspace(),
        algorithm,
        compiled=compiled,
    )


# Each algorithm with its transforms by torch ops and by featx.net.plan.winograd_kernels' compiled
# one-pass kernels (where a C compiler builds them; else the torch path runs twice over).
ALGORITHMS = [
    pytest.param(alg, compiled, id=f"{name}-{'compiled' if compiled else 'torch'}")
    for alg, name in ((winograd.F2, "F2x2"), (winograd.F4, "F4x4"))
    for compiled in (True, False)
]


def rel_err(got, expected) -> float:
    assert expected.abs().max() > 0
    return float((got.float() - expected).abs().max() / expected.abs().max())


GEMMS = [
    pytest.param(False, id="torch.mm"),
    pytest.param(True, id="onednn-packed", marks=pytest.mark.skipif(not PACKED, reason="no oneDNN")),
]


@pytest.mark.parametrize("algorithm,compiled", ALGORITHMS)
@pytest.mark.parametrize("packed", GEMMS)
@pytest.mark.parametrize("h,w", [(1, 1), (1, 6), (2, 2), (3, 3), (5, 7), (8, 8), (13, 6)])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_equals_direct_convolution(h, w, relu, packed, algorithm, compiled):
    x, weight, bias = case(2, 24, 40, h, w)
    with torch.inference_mode():
        y = winograd_conv(x, weight, bias, relu, packed, algorithm=algorithm, compiled=compiled)
    assert y.shape == (2, 40, h, w) and y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, direct(x, weight, bias, relu)) < 1e-5


@pytest.mark.parametrize("algorithm,compiled", ALGORITHMS)
def test_a_wrong_transform_is_caught(algorithm, compiled):
    # The check above can fail: a kernel flipped left-right gives another convolution.
    x, weight, bias = case(1, 8, 8, 6, 6)
    with torch.inference_mode():
        y = winograd_conv(x, weight.flip(-1), bias, False, False, algorithm=algorithm, compiled=compiled)
    assert rel_err(y, direct(x, weight, bias, False)) > 0.1


@pytest.mark.parametrize("algorithm,compiled", ALGORITHMS)
def test_bands_and_a_reused_workspace_change_nothing(monkeypatch, algorithm, compiled):
    ws = winograd.Workspace()
    shapes = [(2, 16, 24, 11, 9), (1, 16, 24, 4, 3), (3, 16, 24, 12, 10), (1, 16, 24, 4, 3)]
    run = lambda x, weight, bias: winograd_conv(x, weight, bias, True, False, ws, algorithm, compiled)  # noqa: E731
    with torch.inference_mode():
        for n, c, k, h, w in shapes:  # large, small, larger, small: stale scratch would show
            x, weight, bias = case(n, c, k, h, w, seed=h)
            assert rel_err(run(x, weight, bias), direct(x, weight, bias, True)) < 1e-5
        monkeypatch.setattr(winograd, "BAND_BYTES", 1)  # one tile row per band...
        monkeypatch.setattr(winograd, "MIN_BAND_TILES", 1)  # ...however few tiles that is
        x, weight, bias = case(2, 16, 24, 11, 9, seed=5)
        assert rel_err(run(x, weight, bias), direct(x, weight, bias, True)) < 1e-5


@pytest.mark.parametrize("algorithm,compiled", ALGORITHMS)
def test_an_image_in_a_zero_padded_batch_gets_its_own_numbers(algorithm, compiled):
    # Tiles are anchored top-left, so the padding below and right of an image only ever
    # meets the zeros its own border padding would have: the valid region matches exactly.
    x, weight, bias = case(1, 16, 24, 5, 7)
    canvas = torch.zeros(2, 16, 10, 12).contiguous(memory_format=torch.channels_last)
    canvas[0, :, :5, :7] = x[0]
    canvas[1] = torch.randn(16, 10, 12)
    with torch.inference_mode():
        alone = winograd_conv(x, weight, bias, True, False, algorithm=algorithm, compiled=compiled)
        batched = winograd_conv(canvas, weight, bias, True, False, algorithm=algorithm, compiled=compiled)
    assert rel_err(batched[:1, :, :5, :7], alone) < 1e-6


def test_f4_is_what_fp32_runs_and_f2_what_bf16_runs():
    # F(4x4)'s transform coefficients (up to 8) cost bf16 5x F(2x2)'s error per layer: the plan keeps it for fp32.
    net = wide_net()
    kinds = {
        dtype: [s.algorithm for s in Plan(net, torch.device("cpu"), dtype).trunk if isinstance(s, WinogradConv)]
        for dtype in (torch.float32, torch.bfloat16)
        if onednn_prepack_works(dtype)
    }
    assert kinds.get(torch.float32, [winograd.F4]) == [winograd.F4]
    assert kinds.get(torch.bfloat16, [winograd.F2]) == [winograd.F2]


def test_bf16_stays_close_to_fp32():
    x, weight, bias = case(2, 64, 64, 12, 9)
    with torch.inference_mode():
        y = winograd_conv(x.to(torch.bfloat16), weight, bias, True, False)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, direct(x.to(torch.bfloat16), weight, bias, True)) < 3e-2


def wide_net(bn: bool = False) -> nn.Module:
    """conv 3->16, pool, conv 16->128 (direct), conv 128->256 [+ BN] (Winograd), pool: pool5-like output."""
    from featx.net.backbones.vgg import DenseVGG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        norm = [nn.BatchNorm2d(256)] if bn else []
        trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(16, 128, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 256, 3, padding=1),
            *norm,
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        head = nn.Sequential(nn.Conv2d(256, 32, 7), nn.ReLU(), nn.Conv2d(32, 24, 1), nn.ReLU())
        if bn:  # statistics far from identity, so folding them into the transformed kernel is tested
            norm[0].running_mean.uniform_(-0.5, 0.5), norm[0].running_var.uniform_(0.5, 2.0)
            norm[0].weight.data.uniform_(0.5, 1.5), norm[0].bias.data.uniform_(-0.2, 0.2)
    return DenseVGG(trunk, head).eval()


@pytest.mark.skipif(not PACKED, reason="Winograd runs on the packed CPU path")
@pytest.mark.parametrize("bn", [False, True], ids=["conv", "conv-bn"])
def test_the_plan_runs_wide_convs_by_winograd_and_agrees_with_direct_kernels(bn):
    net = wide_net(bn)
    fast = Plan(net, torch.device("cpu"), torch.float32)
    plain = Plan(net, torch.device("cpu"), torch.float32, fast_conv=False)
    assert [type(s).__name__ for s in fast.trunk].count("WinogradConv") == 1
    assert not any(isinstance(s, WinogradConv) for s in plain.trunk)
    g = torch.Generator().manual_seed(1)
    # Mixed batch: a 36x44 and a 42x54 image (odd pool5 sizes) in one zero-padded 42x54 canvas.
    a, b = torch.randn(1, 3, 36, 44, generator=g), torch.randn(1, 3, 42, 54, generator=g)
    canvas = torch.zeros(2, 3, 42, 54)
    canvas[0, :, :36, :44], canvas[1] = a[0], b[0]
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    with torch.inference_mode():
        mixed = fast(cl(canvas), [(36, 44), (42, 54)])
        alone = torch.cat([fast(cl(a)), fast(cl(b))])
        reference = torch.cat([plain(cl(a)), plain(cl(b))])
    assert rel_err(mixed, alone) < 1e-5
    assert rel_err(alone, reference) < 1e-5
