"""The describer runs any dense net through the DenseNet interface, not only VGG's; its CUDA
internals (batched assembly, process flags, BatchNorm folding, the dead-device probe) on the CPU."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featx.extract.describer as describer_module
from featx.extract.describer import DenseDescriber, cuda_flags
from featx.extract.descriptor import combine, pooled_per_scale
from featx.net.plan.plan import folded
from featx.net.weights import IMAGENET_MEAN, IMAGENET_STD
from tests.net.test_speed_paths import describer, images, tiny_net


class MeanColour(nn.Module):
    """Not a VGG: a 1x1 conv averaged over each image's valid positions, with no lowering."""

    channels = 4

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 1)

    def forward_pooled(self, x, sizes=None, rezero=True):
        y = self.conv(x)
        sizes = sizes or [tuple(x.shape[2:])] * x.shape[0]
        return torch.stack([y[i, :, :h, :w].float().mean(dim=(1, 2)) for i, (h, w) in enumerate(sizes)])

    def lower(self, device, dtype, **options):
        return self.forward_pooled

    def flops(self, height, width):
        return 2 * 3 * 4 * height * width


def by_hand(net: MeanColour, image: torch.Tensor) -> torch.Tensor:
    """The 1x1 conv of the image's mean normalised colour (a flip changes no mean)."""
    mean, std = torch.tensor(IMAGENET_MEAN) * 255, torch.tensor(IMAGENET_STD) * 255
    colour = ((image.double().mean(dim=(1, 2)) - mean) / std).float()
    with torch.inference_mode():
        return F.linear(colour, net.conv.weight.view(4, 3), net.conv.bias)


def test_any_dense_net_runs_through_the_describer_and_the_scales():
    net = MeanColour()
    d = DenseDescriber(net, IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"), "fp32", flip=True)
    assert d.channels == 4 and not d.prepacked and d.plan == net.forward_pooled
    imgs = [images(1, h, w, seed=i)[0] for i, (h, w) in enumerate([(20, 30), (33, 17), (25, 25)])]
    expected = torch.stack([by_hand(net, x) for x in imgs])
    torch.testing.assert_close(d(imgs), expected, rtol=1e-5, atol=1e-5)
    scaled = [{16: x, 24: x} for x in imgs]
    per_scale = pooled_per_scale(d, scaled, (16, 24), batch_size=2)
    torch.testing.assert_close(combine(per_scale, "mean"), F.normalize(expected), rtol=1e-5, atol=1e-6)


# -- the CUDA internals, run on the CPU ----------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("flip", [True, False], ids=["flip", "no-flip"])
def test_batched_assembly_gives_the_per_image_numbers(precision, flip):
    # CUDA assembles a batch with a few whole-batch ops (masked padding, flips by one gather);
    # the CPU image by image: the same batch, bit for bit.
    d = describer(tiny_net(), precision, prepack=False)
    d.flip = flip
    imgs = [images(1, h, w, seed=i)[0] for i, (h, w) in enumerate([(40, 52), (37, 45), (45, 31), (29, 41)])]
    per_image = d.run(d.stage(imgs, (48, 64), slots=6))
    d.batched = True
    staged = d.stage(imgs, (48, 64), slots=6)
    assert staged.layout is not None
    assert torch.equal(d.run(staged), per_image)


@pytest.fixture
def torch_flags():
    """The process's cuDNN and TF32 flags, restored after the test."""
    b = torch.backends
    if not describer_module.new_tf32_api():
        pytest.skip("this torch has no fp32_precision settings")
    saved = (b.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision)
    benchmark, rnn = b.cudnn.benchmark, b.cudnn.rnn.fp32_precision
    yield
    b.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision = saved
    b.cudnn.benchmark, b.cudnn.rnn.fp32_precision = benchmark, rnn


def flags() -> tuple:
    b = torch.backends
    return b.cudnn.benchmark, b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision


def test_two_device_threads_share_the_process_flags(torch_flags):
    b = torch.backends
    b.cudnn.benchmark, b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision = False, "tf32", "tf32"
    callers = flags()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with cuda_flags():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with cuda_flags():
            second_in.set()
            first_out.wait(10)
            seen["after the first left"] = flags()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    # The second device still runs autotuned and without TF32 after the first one left ...
    assert seen["after the first left"] == (describer_module.CUDNN_AUTOTUNE, "ieee", "ieee")
    # ... and the last to leave gives the caller back its own flags.
    assert flags() == callers


def test_flags_work_after_someone_used_the_new_tf32_api(torch_flags):
    # A notebook or library set the new API: torch's legacy allow_tf32 getter would now raise
    # "a mix of the legacy and new APIs"; featx reads and writes the new API only.
    b = torch.backends
    b.fp32_precision, b.cuda.matmul.fp32_precision = "tf32", "none"
    before = flags()
    with cuda_flags():
        assert flags() == (describer_module.CUDNN_AUTOTUNE, "ieee", "ieee")
        with cuda_flags():  # nested (a describer's run inside the batch loop): no change
            assert flags()[1:] == ("ieee", "ieee")
        assert flags()[1:] == ("ieee", "ieee")
    assert flags() == before and b.fp32_precision == "tf32"


def test_flags_on_a_torch_without_the_new_api(torch_flags, monkeypatch):
    monkeypatch.setattr(describer_module, "new_tf32_api", lambda: False)
    b = torch.backends
    b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = True, True
    with cuda_flags():
        assert (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32) == (False, False)
    assert (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32) == (True, True)


def test_a_device_that_stopped_working_is_told_apart(monkeypatch):
    d = describer(tiny_net(), "fp32", prepack=False)
    assert d.device_works()
    d.cuda = True  # the CUDA probe, on a device whose context an illegal memory access ended

    def dead(device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert d.device_works()
    monkeypatch.setattr(torch.cuda, "synchronize", dead)
    assert not d.device_works()


def test_batch_norm_is_folded_in_fp32_then_cast():
    net = tiny_net(bn=True)
    conv, bn = copy.deepcopy(net.trunk[0]), copy.deepcopy(net.trunk[1])
    d = DenseDescriber(net, IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"), "bf16", prepack=False)
    weight, bias = folded(conv, bn, torch.bfloat16)
    step = d.plan.trunk[0]
    assert torch.equal(step.weight, weight) and torch.equal(step.bias, bias)
    # Folding the bf16-rounded parameters instead gives other weights: the test can fail.
    rounded = folded(copy.deepcopy(conv).bfloat16(), copy.deepcopy(bn).bfloat16(), torch.bfloat16)[0]
    assert not torch.equal(rounded, weight)
    # The plan holds its own rounded weights: the net is left as built (fp32), so every plan made
    # from it rounds the same numbers once.
    assert {p.dtype for p in d.net.parameters()} == {torch.float32}
