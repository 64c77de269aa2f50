"""torchvision's convnets lowered in place (featx.net.plan.lowered): every BatchNorm after a conv
folded, ReLUs and ResNet's residual sums fused into the conv's call, the same numbers as the
module (fp32 to 1e-5; bf16 as close to fp32 as the module in bf16), on oneDNN's packed path and
on the plain one, and a lowered net still right on a device or dtype it was not lowered for.
Against torchvision's own forward, and in padded mixed batches: tests/net/test_families.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featx.net.backbones import get_backbone
from featx.net.padding import randomize_
from featx.net.plan import lowered as lowered_module
from featx.net.plan import onednn_prepack_works
from featx.net.plan.lowered import LoweredCNBlock, LoweredConv2d, LoweredResidual
from featx.net.weights import Weights

CPU = torch.device("cpu")


def dense(name: str):
    """The dense net with random weights, every BatchNorm statistic and bias random too."""
    backbone = get_backbone(name)
    model = randomize_(backbone.torchvision_model(Weights({"kind": "random", "seed": 1}, None)), seed=2)
    return backbone.build(Weights({"kind": "file", "file": "randomised"}, model.state_dict()))


def batch(dtype=torch.float32) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Two images of different sizes, padded top-left, channels-last."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 3, 75, 90)
    x[0, :, :75, :62] = torch.randn(3, 75, 62, generator=g)
    x[1, :, :58, :90] = torch.randn(3, 58, 90, generator=g)
    return x.to(dtype).contiguous(memory_format=torch.channels_last), [(75, 62), (58, 90)]


def unlowered(name: str, dtype=torch.float32) -> torch.Tensor:
    net = dense(name).eval().to(dtype=dtype, memory_format=torch.channels_last)
    with torch.inference_mode():
        return net.forward_pooled(*batch(dtype))


def lowered(name: str, dtype=torch.float32, prepack: bool = True):
    net = dense(name)
    run = net.lower(CPU, dtype, prepack=prepack)
    with torch.inference_mode():
        return net, run(*batch(dtype))


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max())


def test_a_lowered_resnet_has_no_batchnorm_and_one_call_per_conv():
    net, _ = lowered("resnet18")
    kinds = [type(m) for m in net.trunk.modules()]
    assert nn.BatchNorm2d not in kinds
    # conv1, 8 blocks of 2 convs, 3 downsamples; the stem's ReLU fused, the blocks' ReLUs in their convs.
    assert kinds.count(LoweredConv2d) == 20 and kinds.count(LoweredResidual) == 8
    assert nn.ReLU not in kinds and nn.Conv2d not in kinds
    spatial = [m for m in net.trunk.modules() if isinstance(m, LoweredConv2d) and m.kernel_size != (1, 1)]
    assert all(m.relu and m.folded for m in spatial)


def test_lowering_a_lowered_net_again_changes_nothing():
    net, first = lowered("resnet18")
    modules = list(net.trunk.modules())
    run = net.lower(CPU, torch.float32)
    assert list(net.trunk.modules()) == modules  # the same module objects: nothing left to lower
    with torch.inference_mode():
        torch.testing.assert_close(run(*batch()), first, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenet_v3_small", "regnet_y_400mf", "densenet121"])
@pytest.mark.parametrize("prepack", [True, False], ids=["packed", "plain"])
def test_lowered_is_the_module_in_fp32(name, prepack):
    net, ours = lowered(name, prepack=prepack)
    assert any(isinstance(m, LoweredConv2d) for m in net.trunk.modules())
    assert close(ours, unlowered(name), 1e-5)


@pytest.mark.skipif(not onednn_prepack_works(torch.bfloat16), reason="no native bf16 in oneDNN on this CPU")
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_lowered_bf16_is_as_close_to_fp32_as_the_module_in_bf16(name):
    exact = unlowered(name)
    _, ours = lowered(name, torch.bfloat16)
    theirs = unlowered(name, torch.bfloat16)
    ours_cos = F.cosine_similarity(ours.float(), exact).min()
    theirs_cos = F.cosine_similarity(theirs.float(), exact).min()
    assert ours_cos >= 0.999 and 1 - ours_cos <= 2 * (1 - theirs_cos)


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny"])
def test_a_lowered_net_moved_to_another_dtype_runs_its_own_weights(name):
    """The steps are made for one device and dtype; anything else runs F.conv2d and F.linear on
    the folded weights."""
    net, ours = lowered(name)
    net.to(torch.float64)
    x, sizes = batch(torch.float64)
    with torch.inference_mode():
        again = net.forward_pooled(x, sizes)
    assert close(again.float(), ours, 1e-5)


@pytest.mark.parametrize("chunk_bytes", [lowered_module.MLP_CHUNK_BYTES, 1 << 16], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-nchw", "bf16-channels-last"])
def test_convnext_blocks_run_their_mlp_as_packed_gemms_with_the_modules_numbers(dtype, chunk_bytes, monkeypatch):
    """In chunks of rows too: 64 rows each (the least) against stage 1's 874, the last one short."""
    if dtype == torch.bfloat16 and not onednn_prepack_works(dtype):
        pytest.skip("no native bf16 in oneDNN on this CPU")
    monkeypatch.setattr(lowered_module, "MLP_CHUNK_BYTES", chunk_bytes)
    net, ours = lowered("convnext_tiny", dtype)
    assert sum(isinstance(m, LoweredCNBlock) for m in net.trunk.modules()) == 18
    exact = unlowered("convnext_tiny")
    if dtype == torch.float32:
        assert close(ours, exact, 1e-5)
    else:
        theirs = unlowered("convnext_tiny", dtype)
        ours_cos, theirs_cos = (F.cosine_similarity(y.float(), exact).min() for y in (ours, theirs))
        assert ours_cos >= 0.999 and 1 - ours_cos <= 2 * (1 - theirs_cos)


def test_the_provenance_says_how_the_lowered_net_runs():
    said = get_backbone("resnet50").kernels(CPU, torch.bfloat16)
    if onednn_prepack_works(torch.bfloat16):
        assert said == (
            "oneDNN's packed kernels, BatchNorm folded, ReLU and residual sums fused, channels-last, bfloat16"
        )
    convnext = get_backbone("convnext_tiny").kernels(CPU, torch.float32)
    assert convnext.endswith("each block's MLP two packed GEMMs, GELU fused, layer scale folded, NCHW, float32")
