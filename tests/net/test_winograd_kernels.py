"""featx.net.plan.winograd_kernels: bf16 rounded to nearest even once per value, the same numbers on
one thread or several, and a clean fall back to torch ops where no C compiler builds them.
(tests/net/test_winograd.py holds both transform paths to the direct convolution.)"""

from __future__ import annotations

import pytest
import torch

from featx.net.plan import winograd, winograd_kernels
from tests.net.test_winograd import case, direct, rel_err


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """No cached kernels: the next kernels() call compiles into a temporary cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    winograd_kernels.kernels.cache_clear()
    yield tmp_path
    winograd_kernels.kernels.cache_clear()


def built(algorithm, dtype):
    k = winograd_kernels.kernels(algorithm, dtype)
    if k is None:
        pytest.skip("no C compiler here: featx runs the torch transforms (tested in test_winograd.py)")
    return k


def test_a_build_lands_in_the_cache_folder_and_is_reused(fresh_build):
    built(winograd.F2, torch.bfloat16)
    libraries = list((fresh_build / "featx" / "kernels").glob("winograd-*.so"))
    assert len(libraries) == 1
    stamp = libraries[0].stat().st_mtime_ns
    winograd_kernels.kernels.cache_clear()
    built(winograd.F2, torch.bfloat16)  # a second process (here: a cleared cache) loads it
    assert libraries[0].stat().st_mtime_ns == stamp


def test_bf16_values_are_rounded_once_to_nearest_even():
    # F(2x2)'s input transform sums at most four +-bf16 values: exact in fp32, so the kernel's
    # one rounding must equal torch's fp64 -> bf16 rounding (round to nearest, ties to even);
    # truncating instead of rounding would differ in about half the values.
    kern = built(winograd.F2, torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 8, 40, generator=g).bfloat16()  # NHWC, 40 channels (a vector remainder)
    v = torch.empty(16, 3 * 4, 40, dtype=torch.bfloat16)
    kern.input(x, v, 0, 3, 4)
    pad = torch.zeros(1, 8, 10, 40, dtype=torch.float64)
    pad[:, 1:7, 1:9] = x.double()
    tiles = pad.unfold(1, 4, 2).unfold(2, 4, 2)  # [1, 3, 4, 40, 4, 4]
    bt = torch.tensor(winograd.F2.bt, dtype=torch.float64)
    expected = torch.einsum("ai,nyxcij,bj->abnyxc", bt, tiles, bt).reshape(16, 12, 40)
    assert torch.equal(v, expected.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_threads_do_not_change_a_number(dtype, monkeypatch):
    # 1-3 OpenMP threads, and 1-3 Python threads (the split where the build has no OpenMP).
    algorithm = winograd.F2
    kern = built(algorithm, dtype)
    x, weight, bias = case(3, 32, 24, 13, 11)
    x = x.to(dtype)
    u = winograd.transform_weight(weight, algorithm).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for openmp in (kern.openmp, False):
            monkeypatch.setattr(kern, "openmp", openmp)
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                with torch.inference_mode():
                    results.append(winograd.conv3x3(x, u, bias.to(dtype), True, winograd.Workspace(), algorithm))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert rel_err(results[0], direct(x, weight, bias, True)) < (1e-5 if dtype == torch.float32 else 3e-2)


def test_compiled_bf16_is_no_less_accurate_than_torch_ops():
    # Torch rounds every intermediate sum to bf16; the kernel rounds each value once.
    built(winograd.F2, torch.bfloat16)
    x, weight, bias = case(2, 64, 64, 12, 9)
    xb, u = x.bfloat16(), winograd.transform_weight(weight, winograd.F2).bfloat16()
    expected = direct(xb, weight, bias, True)
    with torch.inference_mode():
        errors = [
            rel_err(
                winograd.conv3x3(xb, u, bias.bfloat16(), True, winograd.Workspace(), winograd.F2, compiled=compiled),
                expected,
            )
            for compiled in (True, False)
        ]
    assert errors[0] <= errors[1] * 1.05 and errors[0] < 3e-2


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"], ids=["no-compiler", "failed-build"])
def test_without_a_working_compiler_the_torch_path_runs(fresh_build, monkeypatch, compiler):
    monkeypatch.setenv("CC", compiler)
    assert winograd_kernels.kernels(winograd.F2, torch.float32) is None
    x, weight, bias = case(2, 16, 24, 7, 5)
    u = winograd.transform_weight(weight, winograd.F2)
    with torch.inference_mode():
        y = winograd.conv3x3(x, u, bias, True, winograd.Workspace(), winograd.F2)
    assert rel_err(y, direct(x, weight, bias, True)) < 1e-5
    assert not list(fresh_build.rglob("*.so"))


def test_winograd_reaches_down_to_64_channels_only_with_compiled_transforms(fresh_build, monkeypatch):
    # Measured: with torch-op transforms Winograd loses below 128 input channels (VGG's conv1_2,
    # conv2_1); compiled, bf16's F(2x2) wins from 64 -> 64 and fp32's F(4x4) from 64 -> 128.
    from featx.net.plan import conv_kernels, onednn_prepack_works
    from featx.net.plan.plan import winograd_channels

    said = conv_kernels(torch.device("cpu"), torch.float32)  # provenance, where oneDNN runs the plan
    if winograd_kernels.kernels(winograd.F2, torch.bfloat16) is not None:
        assert winograd_channels(torch.bfloat16) == (64, 64, True)
        assert winograd_channels(torch.float32) == (64, 128, True)
        reach = "64 -> 128 channels" in said and "transforms compiled" in said
        assert not onednn_prepack_works(torch.float32) or reach
    monkeypatch.setenv("CC", "/nonexistent/cc")
    winograd_kernels.kernels.cache_clear()
    assert winograd_channels(torch.bfloat16) == (128, 128, False)
    assert winograd_channels(torch.float32) == (128, 128, False)
    said = conv_kernels(torch.device("cpu"), torch.float32)
    assert not onednn_prepack_works(torch.float32) or "transforms by torch ops" in said
