"""The plan's reused activation buffers (featx.net.plan.steps.Activations) change no number: every
trunk output written into one of two kept buffers equals it allocated afresh, across calls of
changing shapes, inside mixed batches, over several passes, through a conv without ReLU, a
Winograd conv, a module that hands back its input, and a non-VGG pool."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featx.net.backbones.vgg import DenseVGG
from featx.net.plan import Plan, onednn_prepack_works

DTYPES = [
    pytest.param(
        dtype,
        id=str(dtype).split(".")[1],
        marks=pytest.mark.skipif(not onednn_prepack_works(dtype), reason=f"no packed oneDNN path in {dtype}"),
    )
    for dtype in (torch.float32, torch.bfloat16)
]


def net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Identity(),  # hands back its input: the next conv must not write into that buffer
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(16, 128, 3, padding=1),  # no ReLU: oneDNN's in-place form without a post-op
            nn.Conv2d(128, 128, 3, padding=1),
            nn.ReLU(),  # Winograd on the packed path
            nn.Conv2d(128, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, ceil_mode=True),  # not VGG's pool: run as its module
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        head = nn.Sequential(nn.Conv2d(64, 32, 5), nn.ReLU(), nn.Conv2d(32, 24, 1), nn.ReLU())
        return DenseVGG(trunk, head).eval()


def images(seed: int, *sizes: tuple[int, int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, h, w, generator=g) for h, w in sizes]


def batch(parts: list[torch.Tensor], dtype) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The images top-left in one zero-padded canvas, channels-last, and their sizes."""
    h, w = max(p.shape[2] for p in parts), max(p.shape[3] for p in parts)
    canvas = torch.zeros(len(parts), 3, h, w)
    for i, p in enumerate(parts):
        canvas[i, :, : p.shape[2], : p.shape[3]] = p[0]
    return canvas.to(dtype).contiguous(memory_format=torch.channels_last), [tuple(p.shape[2:]) for p in parts]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max() / b.abs().max()) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_reused_buffers_give_the_fresh_numbers_across_changing_shapes(dtype):
    model = net()
    reusing = Plan(model, torch.device("cpu"), dtype)
    reusing.activations.min_bytes = 0  # every trunk output but the last into a kept buffer
    fresh = Plan(model, torch.device("cpu"), dtype, reuse_activations=False)
    assert fresh.activations is None
    # Large, then small (a buffer larger than needed), then larger still (buffers regrown),
    # then mixed batches whose padding must stay zero in the reused memory.
    calls = [
        images(1, (90, 70), (90, 70)),
        images(2, (40, 48)),
        images(3, (100, 120)),
        images(4, (66, 90), (90, 66), (45, 45)),
        images(5, (70, 90)),
    ]
    with torch.inference_mode():
        for parts in calls:
            x, sizes = batch(parts, dtype)
            assert close(reusing(x, sizes), fresh(x, sizes))
    assert reusing.activations.nbytes > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_earlier_passes_survive_later_ones(dtype):
    # One image per trunk pass: pool5 maps of the first passes wait for the head while later
    # passes run through the same buffers; each image's row equals the image run alone.
    model = net()
    plan = Plan(model, torch.device("cpu"), dtype, pass_pixels=1)
    plan.activations.min_bytes = 0
    parts = images(6, (80, 96), (72, 64), (96, 80))
    x, sizes = batch(parts, dtype)
    with torch.inference_mode():
        together = plan(x, sizes)
        alone = torch.cat([plan(*batch([p], dtype)) for p in parts])
    assert close(together, alone)


def test_small_outputs_stay_fresh():
    # Below glibc's largest mmap threshold the heap serves outputs resident: nothing is kept.
    plan = Plan(net(), torch.device("cpu"), torch.float32)
    if plan.activations is None:
        pytest.skip("no packed oneDNN path")
    with torch.inference_mode():
        plan(*batch(images(7, (64, 64)), torch.float32))
    assert plan.activations.nbytes == 0


def test_outputs_over_the_cap_stay_fresh():
    # A lone huge image must not leave the plan holding its activations for good.
    plan = Plan(net(), torch.device("cpu"), torch.float32)
    if plan.activations is None:
        pytest.skip("no packed oneDNN path")
    plan.activations.min_bytes = 0
    # A 64x64 image: 16-channel outputs of 256 KB (kept), 128-channel ones of 512 KB (over the cap).
    plan.activations.max_bytes = 400 << 10
    x, sizes = batch(images(8, (64, 64)), torch.float32)
    with torch.inference_mode():
        y = plan(x, sizes)
    # Two activation buffers of 256 KB and pool1's row maxima (128 KB); 1.1 MB without the cap.
    assert plan.activations.nbytes == (256 + 256 + 128) << 10
    assert close(y, Plan(net(), torch.device("cpu"), torch.float32, reuse_activations=False)(x, sizes))
