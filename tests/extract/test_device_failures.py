"""A device that runs out of memory or stops working mid-run: CUDA's failures, raised by test
doubles around a CPU describer."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from typer.testing import CliRunner

from featx.cli import app
from featx.errors import DeviceFailed
from featx.extract.describer import DenseDescriber
from featx.extract.descriptor import pooled_per_scale
from tests.conftest import write_images
from tests.net.test_speed_paths import describer, images, tiny_net


class OutOfMemoryAbove:
    """A describer whose device holds at most `limit` images a batch: a larger batch allocates
    (a tensor its frame keeps, as the net's activations would be) and raises CUDA's OOM."""

    def __init__(self, inner: DenseDescriber, limit: int):
        self.inner, self.limit = inner, limit
        self.tried: list[int] = []
        self.failed_batches: list[weakref.ref] = []
        self.alive_when_retried: list[bool] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, staged, rezero=True):
        self.tried.append(len(staged.sizes))
        gc.collect()  # only what something still refers to stays alive
        self.alive_when_retried.append(any(ref() is not None for ref in self.failed_batches))
        if len(staged.sizes) > self.limit:
            activations = torch.empty(len(staged.sizes), 1 << 16)
            self.failed_batches += [weakref.ref(activations), weakref.ref(staged.pixels)]
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {activations.nbytes} bytes")
        return self.inner.run(staged, rezero)


def same_size(n: int) -> list[dict[int, torch.Tensor]]:
    return [{32: images(1, 40, 52, seed=i)[0]} for i in range(n)]


def test_out_of_memory_halves_the_batch_after_freeing_it():
    d = describer(tiny_net(), "fp32", prepack=False)
    scaled = same_size(6)
    expected = pooled_per_scale(d, scaled, (32,), 8)[0]
    small = OutOfMemoryAbove(d, limit=2)
    failed: dict = {}
    got = pooled_per_scale([small], scaled, (32,), 8, failed=failed)[0]
    assert not failed and (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    # 6 -> 3 (too large too) -> 2 + 1; the other 3 at once in halves: no image-by-image retry
    assert small.tried == [6, 3, 2, 1, 2, 1]
    # ... and the failed batches' tensors were gone before any retry ran
    assert not any(small.alive_when_retried)


def test_later_batches_as_large_as_one_that_ran_out_go_in_halves_at_once():
    small = OutOfMemoryAbove(describer(tiny_net(), "fp32", prepack=False), limit=2)
    pooled_per_scale([small], same_size(8), (32,), 4, failed={})
    assert small.tried == [4, 2, 2, 2, 2]  # the second batch of 4 is not tried whole


def test_an_image_that_does_not_fit_alone_fails_alone():
    small = OutOfMemoryAbove(describer(tiny_net(), "fp32", prepack=False), limit=0)
    failed: dict = {}
    out = pooled_per_scale([small], same_size(4), (32,), 4, failed=failed)[0]
    assert sorted(failed) == [0, 1, 2, 3] and not out.any()
    assert all(isinstance(e, torch.cuda.OutOfMemoryError) and e.__traceback__ is None for e in failed.values())
    assert small.tried == [4, 2, 1, 1, 1, 1]  # halves down to one image, then that image fails
    with pytest.raises(torch.cuda.OutOfMemoryError):  # without a failed dict it propagates
        pooled_per_scale([small], same_size(2), (32,), 4)


class DeadAfter:
    """A describer whose device dies at its `n`-th batch (an illegal memory access), after which
    every batch fails and the device probe says so."""

    def __init__(self, inner: DenseDescriber, n: int):
        self.inner, self.n, self.runs = inner, n, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, staged, rezero=True):
        self.runs += 1
        if self.runs >= self.n:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")
        return self.inner.run(staged, rezero)

    def device_works(self) -> bool:
        return self.runs < self.n


def test_a_dead_device_stops_the_run_in_one_line():
    dead = DeadAfter(describer(tiny_net(), "fp32", prepack=False), n=2)
    failed: dict = {}
    with pytest.raises(DeviceFailed) as raised:
        pooled_per_scale([dead], same_size(8), (32,), 2, failed=failed)
    message = str(raised.value)
    assert "\n" not in message and "illegal memory access" in message and "stopped working" in message
    assert not failed and dead.runs == 2  # no image was marked failed, nothing more was tried


def test_an_image_error_on_a_working_device_still_costs_only_its_row():
    broken = DeadAfter(describer(tiny_net(), "fp32", prepack=False), n=1)
    broken.device_works = lambda: True  # the error was the batch's, not the device's
    failed: dict = {}
    pooled_per_scale([broken], same_size(3), (32,), 4, failed=failed)
    assert sorted(failed) == [0, 1, 2]  # retried image by image, each failing on its own


@pytest.mark.slow
def test_extract_stops_with_one_line_and_exit_1_when_the_device_dies(tmp_path, monkeypatch):
    write_images(tmp_path / "in", [(64, 48), (60, 45), (66, 50), (70, 52), (64, 48)])
    calls = {"n": 0}
    run = DenseDescriber.run

    def dying(self, staged, rezero=True):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return run(self, staged, rezero)

    monkeypatch.setattr(DenseDescriber, "run", dying)
    monkeypatch.setattr(DenseDescriber, "device_works", lambda self: calls["n"] < 2)
    args = ["extract", str(tmp_path / "in"), "-o", str(tmp_path / "f.parquet"), "--model", "vgg11"]
    args += ["--weights", "random", "--layer", "pool5", "--scales", "32", "--batch-size", "2", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "stopped working" in lines[0] and "Traceback" not in result.output
