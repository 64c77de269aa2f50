"""The plan's CUDA ways, run on the CPU: padding zeroed by masks in few launches, and no host
sync in stage + run (test doubles stand in for what only a GPU would show)."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from featx.extract.descriptor import pooled_per_scale
from featx.net.plan import masks
from featx.net.plan.plan import Plan
from tests.net.test_speed_paths import describer, images, tiny_net

SIZES = [(40, 52), (37, 45), (45, 31), (29, 41), (33, 33), (31, 60)]


def mixed(n: int, seed: int = 0) -> list[torch.Tensor]:
    return [images(1, h, w, seed=seed + i)[0] for i, (h, w) in enumerate(SIZES[:n])]


def cuda_way(net, precision: str = "fp32"):
    """A CPU describer assembling and zeroing as it does on CUDA (plain kernels, as cuDNN's)."""
    d = describer(net, precision, prepack=False)
    d.batched, d.plan.zeroing = True, "masks"
    return d


class Launches(TorchDispatchMode):
    """Counts the ops dispatched (each a kernel launch on CUDA)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def zeroing(self) -> int:
        return sum(self.ops[name] for name in ("zero_", "fill_", "masked_fill_"))


def launches(d, n: int) -> Launches:
    staged = d.stage(mixed(n), (48, 64))
    with torch.inference_mode(), Launches() as counted:
        d.run(staged)
    return counted


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("layer", ["fc7", "pool5"])
def test_masks_zero_the_padding_as_the_strips_do(precision, layer):
    strips = describer(tiny_net(layer), precision, prepack=False)
    assert strips.plan.zeroing == "strips"  # a CPU's default
    imgs = mixed(6, seed=3)
    expected = strips.run(strips.stage(imgs, (48, 64)))
    assert torch.equal(cuda_way(tiny_net(layer), precision).run(strips.stage(imgs, (48, 64))), expected)


def test_cuda_zeroes_the_padding_in_a_few_launches_whatever_the_batch_holds():
    # Strips: a write per run of equal sizes per layer, growing with the images (~130 a batch
    # on VGG16); masks: one masked op per zeroing step and one for the input, for 2 or 6 images.
    strips = [launches(describer(tiny_net(), "fp32", prepack=False), n).zeroing for n in (2, 6)]
    d = cuda_way(tiny_net())
    cuda = [launches(d, n) for n in (2, 6)]
    steps = sum(hasattr(step, "out_size") for step in d.plan.trunk)  # the convs and pools
    assert strips[1] > strips[0] > 2 * steps
    assert cuda[0].zeroing == cuda[1].zeroing == cuda[1].ops["masked_fill_"] <= steps + 1
    assert cuda[1].ops["flip"] == 0 and cuda[1].ops["gather"] == 1  # every flip in one op


def test_zeroing_is_strips_on_a_cpu_by_default_and_checked():
    plan = Plan(tiny_net(), torch.device("cpu"), torch.float32, prepack=False, zeroing=None)
    assert plan.zeroing == "strips"
    with pytest.raises(ValueError, match="zeroing"):
        Plan(tiny_net(), torch.device("cpu"), torch.float32, zeroing="mask")


# -- no host sync between staging a batch and its result -----------------------------------------
class NoSync(TorchDispatchMode):
    """Fails on what waits for the GPU on CUDA: reading a value on the host (.item(), bool(),
    int()), and building a tensor from Python data straight on the batch's device (a pageable
    copy, which CUDA does synchronously: torch.tensor(list, device=...))."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            raise AssertionError("a host sync: a tensor's value read on the host")
        return func(*args, **(kwargs or {}))


@contextmanager
def synchronising_calls_fail():
    """Within: NoSync, and torch.tensor / torch.as_tensor given a device fail."""
    originals = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}

    def guard(name):
        def guarded(*args, **kwargs):
            if kwargs.get("device") is not None:
                raise AssertionError(f"torch.{name}(..., device=...): a synchronising copy on CUDA")
            return originals[name](*args, **kwargs)

        return guarded

    try:
        for name in originals:
            setattr(torch, name, guard(name))
        with NoSync():
            yield
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)


@pytest.mark.parametrize("layer", ["fc7", "pool5"])
def test_stage_and_run_have_no_host_sync(layer):
    d = cuda_way(tiny_net(layer))
    imgs = mixed(6, seed=1)
    with torch.inference_mode():
        expected = torch.cat([d([x]) for x in imgs])  # one by one, outside the guard
    with synchronising_calls_fail():
        result = d.run(d.stage(imgs, (48, 64), slots=8))
    assert (result - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_the_guard_catches_a_synchronising_call():
    with synchronising_calls_fail(), pytest.raises(AssertionError, match="synchronising"):
        torch.tensor([1.0, 2.0], device="cpu")
    with synchronising_calls_fail(), pytest.raises(AssertionError, match="host sync"):
        torch.ones(2).sum().item()
    assert torch.tensor([1.0], device="cpu").item() == 1.0  # restored


def test_several_batches_through_the_driver_without_a_sync_before_each_result(monkeypatch):
    d = cuda_way(tiny_net())
    scaled = [{32: x} for x in mixed(6, seed=2)]
    reference = pooled_per_scale(describer(tiny_net(), "fp32", prepack=False), scaled, (32,), 4)[0]
    run = d.run

    def guarded_run(staged, rezero=True):
        with synchronising_calls_fail():
            return run(staged, rezero)

    monkeypatch.setattr(d, "run", guarded_run)
    got = pooled_per_scale(d, scaled, (32,), 4, buckets=True)[0]
    assert (got - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_upload_pins_and_copies_without_waiting(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(
        torch.Tensor, "to", lambda self, device, non_blocking=False: calls.append((str(device), non_blocking)) or self
    )
    host = torch.arange(3.0)
    masks.upload(host, torch.device("cuda", 0))
    assert calls == ["pin", ("cuda:0", True)]
    calls.clear()
    assert masks.upload(host, torch.device("cpu")) is host and not calls
