"""The dense VGG lowered to fused steps: the fast path behind DenseDescriber.

The paper's dense evaluation (arXiv 1409.1556, Sec. 3.2) makes fc6 a 7x7 convolution over
pool5; a 7x7 convolution without padding is one GEMM over the 7x7 windows of its input, and
fc7 (1x1) a GEMM over positions. So the plan is: the conv trunk (conv [+ BN folded] + ReLU
fused, max pools), then fc6/fc7 as GEMMs over row chunks of pool5 windows, summed per image.

Why not just call the module: in eager mode oneDNN re-lays out every convolution weight on
every call (fc6's 411 MB kernel costs ~0.2 s per call on a 2-core Zen 5) and ReLU is a
separate pass over memory. On a CPU with oneDNN the plan packs every weight once, in the
kernel's blocked layout, and fuses ReLU into the op; elsewhere (CUDA, or `prepack=False`)
the same steps run as plain F.conv2d / F.linear (cuDNN / cuBLAS), which tests on CPU cover.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from featx.errors import BadInput
from featx.net import winograd, winograd_kernels

# A nominal trunk input (image and its flip at Q=384, 4:3) for packing conv weights once. In
# bf16 oneDNN's blocked layout for these convs does not depend on the spatial size; in fp32 it
# does (AVX2 kernels: conv5 of VGG16 at 16x21 runs at 48 GFLOP/s with weights packed for 24x32,
# at 234 packed for its own shape, benchmarks/layers.py), so fp32 convs are packed per input
# shape, the last PACKED_SHAPES shapes kept (a repack costs ~1-2% of a forward pass).
NOMINAL_INPUT = (2, 3, 384, 512)
PACKED_SHAPES = 3
# Pixels per trunk pass. On a CPU a larger batch gains nothing (a conv's GEMM already has
# h*w rows) but costs memory (conv1 at 64 channels); on a GPU batches fill the device.
CPU_PASS_PIXELS = 2 * 512 * 704
CUDA_PASS_PIXELS = 32 * 512 * 704
# Winograd for a 3x3 conv on the CPU: F(4x4, 3x3) in fp32, F(2x2, 3x3) in bf16/fp16 (F(4x4)'s
# larger transform coefficients cost bf16 3% relative L2 error per layer, F(2x2) 0.6%, direct
# 0.3%), from these input and output channel counts, by algorithm and whether its transforms
# run compiled (featx.net.winograd_kernels) or as torch ops. Measured against oneDNN's direct
# kernel (benchmarks/layers.py --images 4, 2-core EPYC): with torch-op transforms fp32 F(4x4)
# 1.25x at 128->128, 1.6-3x from 128->256 up, bf16 F(2x2) 1.2x at 128->128, 1.2-1.7x above, and
# nothing gained with 64 input channels; compiled, bf16 F(2x2) gains 1.23-1.30x at 64->64
# (conv1_2) and 1.10-1.33x at 64->128 (conv2_1), fp32 F(4x4) (AVX2) 1.24x at 64->128, none at 64->64.
WINOGRAD_MIN_CHANNELS = {
    (winograd.F2, True): (64, 64),
    (winograd.F4, True): (64, 128),
    (winograd.F2, False): (128, 128),
    (winograd.F4, False): (128, 128),
}
# glibc serves an allocation of >= 32 MB (its largest mmap threshold) from fresh pages and
# unmaps it on free, so an activation that size is page-faulted in again on every call (~8% of
# a forward pass at Q=512 or in a 720k-pixel pass, bf16, benchmarks/layers.py). On the packed
# CPU path such trunk outputs go into reused buffers instead: convs by oneDNN's in-place form
# (out = relu(conv(x) + out) from zeroed memory), pools and Winograd by writing into them.
# Smaller outputs stay fresh: the heap serves them resident, and the in-place form's extra
# pass over `out` would cost 5-15% of conv1/conv2_1 there. CUDA's caching allocator needs neither.
FRESH_PAGES_BYTES = 32 << 20
# Larger outputs than this (a lone very large image; a 720k-pixel pass's conv1 output is 92 MB
# in bf16, 184 MB in fp32) stay fresh too, so the plan does not hold such memory for good.
MAX_REUSED_BYTES = 256 << 20
# Rows (window positions) per head GEMM: ~1k rows keep fc6 compute-bound on a CPU (weight
# read once per chunk) while the window matrix stays ~50 MB in bf16.
CPU_HEAD_ROWS = 1024
CUDA_HEAD_ROWS = 8192


@cache
def _glibc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to do
        return None


# Growth of resident memory (over its level after the first batch) that makes the plan give
# glibc's free heap pages back to the OS (see HeapTrimmer).
TRIM_MARGIN_MB = 256


def resident_bytes() -> int | None:
    """This process's resident set size (Linux /proc), None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """After a batch, give glibc's free heap pages back to the OS once resident memory has
    grown by more than `margin_mb` over its level after the first batch (glibc only).

    glibc serves the 1-32 MB activations of each new image shape from its heap and keeps
    what they free resident and fragmented: measured here (VGG16, Q up to 512), RSS grew
    30-50 MB per new shape without end (2.6 GB after 150 shapes). Trimming after every batch
    keeps it flat but makes every freed page fault in again (30k-76k faults per forward pass,
    7-8% of it); trimming only past the margin was 9% faster over 60 shapes with RSS bounded
    by the margin (benchmarks: RSS at two folder sizes). Nothing process-wide is changed:
    malloc_trim only returns what is free.
    """

    def __init__(self, margin_mb: int = TRIM_MARGIN_MB):
        self.margin = margin_mb << 20
        self.limit: int | None = None

    def __call__(self) -> None:
        trim = _glibc()
        rss = resident_bytes() if trim is not None else None
        if rss is None:
            return
        if self.limit is None:
            self.limit = rss + self.margin
        elif rss > self.limit:
            trim(0)
            after = resident_bytes() or rss
            # Live memory may have grown for good (larger images, kernel caches): trim again
            # only once the heap has grown by another margin over what stayed.
            self.limit = max(self.limit, after + self.margin)


@cache
def onednn_prepack_works(dtype: torch.dtype) -> bool:
    """Whether this torch build runs oneDNN's pre-packed conv/linear ops in `dtype` (probed)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return False
    try:
        with torch.inference_mode():
            x = torch.ones(1, 8, 5, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.ones(4, 8, 3, 3, dtype=dtype)
            pw = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, [1, 8, 5, 5])
            y = torch.ops.mkldnn._convolution_pointwise(x, pw, None, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
            lw = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 8, dtype=dtype), None)
            z = torch.ops.mkldnn._linear_pointwise(torch.ones(3, 8, dtype=dtype), lw, None, "none", [], "")
        return y.shape == (1, 4, 5, 5) and float(y[0, 0, 2, 2]) == 72.0 and float(z[0, 0]) == 8.0
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@dataclass
class Conv:
    """conv [+ folded BN] [+ ReLU]: one fused oneDNN op (packed) or F.conv2d + relu_."""

    weight: torch.Tensor  # packed (opaque oneDNN layout) or plain channels-last
    bias: torch.Tensor
    kernel: tuple[int, int]
    padding: list[int]
    stride: list[int]
    dilation: list[int]
    groups: int
    relu: bool
    packed: bool
    # fp32 only: the plain channels-last weight, packed again for each input shape (see
    # NOMINAL_INPUT), and the packings of the last PACKED_SHAPES shapes.
    plain: torch.Tensor | None = None
    by_shape: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return (
            _out_size(h, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0]),
            _out_size(w, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1]),
        )

    def packed_for(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The weight in the layout oneDNN's kernel for this input shape wants."""
        if self.plain is None:
            return self.weight
        w = self.by_shape.get(shape)
        if w is None:
            w = torch.ops.mkldnn._reorder_convolution_weight(
                self.plain, self.padding, self.stride, self.dilation, self.groups, list(shape)
            )
            self.by_shape[shape] = w
            while len(self.by_shape) > PACKED_SHAPES:
                self.by_shape.popitem(last=False)
        else:
            self.by_shape.move_to_end(shape)
        return w

    def out_shape(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        return (x.shape[0], self.bias.shape[0], *self.out_size(x.shape[2], x.shape[3]))

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`out` (packed path only): a channels-last buffer of out_shape(x) to write into."""
        if self.packed:
            w = self.packed_for(tuple(x.shape))
            if out is not None:  # oneDNN's in-place form, out = relu(conv(x) + out), from zero
                out.zero_()
                return torch.ops.mkldnn._convolution_pointwise_.binary(
                    out,
                    x,
                    w,
                    self.bias,
                    self.padding,
                    self.stride,
                    self.dilation,
                    self.groups,
                    "add",
                    None,
                    "relu" if self.relu else None,
                    [],
                    None,
                )
            return torch.ops.mkldnn._convolution_pointwise(
                x,
                w,
                self.bias,
                self.padding,
                self.stride,
                self.dilation,
                self.groups,
                "relu" if self.relu else "none",
                [],
                "",
            )
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.relu_(x) if self.relu else x


@dataclass
class WinogradConv:
    """A 3x3 conv (stride 1, padding 1) [+ folded BN] [+ ReLU] by Winograd (featx.net.winograd)."""

    weights: list[torch.Tensor] = field(repr=False)  # the transformed kernel, packed for oneDNN's GEMMs
    bias: torch.Tensor
    relu: bool
    workspace: winograd.Workspace = field(repr=False)
    algorithm: winograd.Algorithm = winograd.F2

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return h, w

    def out_shape(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        return (x.shape[0], self.bias.shape[0], x.shape[2], x.shape[3])

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return winograd.conv3x3(x, self.weights, self.bias, self.relu, self.workspace, self.algorithm, out)


@dataclass
class Linear:
    """A position-wise layer of the head as a GEMM over rows [+ ReLU]."""

    weight: torch.Tensor  # packed, or plain [out, in]
    bias: torch.Tensor
    relu: bool
    packed: bool
    out_features: int

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(
                rows, self.weight, self.bias, "relu" if self.relu else "none", [], ""
            )
        y = F.linear(rows, self.weight, self.bias)
        return F.relu_(y) if self.relu else y


def winograd_algorithm(dtype: torch.dtype) -> winograd.Algorithm:
    """F(4x4, 3x3) in fp32; F(2x2, 3x3) in bf16/fp16, where F(4x4)'s coefficients cost 5x F(2x2)'s error."""
    return winograd.F4 if dtype == torch.float32 else winograd.F2


def winograd_channels(dtype: torch.dtype) -> tuple[int, int, bool]:
    """(least input channels, least output channels, transforms compiled) for Winograd in `dtype`
    on this machine (builds featx.net.winograd_kernels on first use)."""
    algorithm = winograd_algorithm(dtype)
    compiled = winograd_kernels.kernels(algorithm, dtype) is not None
    return (*WINOGRAD_MIN_CHANNELS[(algorithm, compiled)], compiled)


def conv_kernels(device: torch.device, dtype: torch.dtype) -> str:
    """In words, which kernels a default Plan runs the convolutions with (for provenance)."""
    if device.type == "cpu" and onednn_prepack_works(dtype):
        least_in, least_out, compiled = winograd_channels(dtype)
        return (
            f"oneDNN, weights pre-packed; 3x3 convs of >= {least_in} -> {least_out} channels by Winograd "
            f"{winograd_algorithm(dtype).name}, transforms {'compiled' if compiled else 'by torch ops'}"
        )
    return "cuDNN (its own algorithm choice)" if device.type == "cuda" else "torch's default kernels"


def winograd_suits(conv: nn.Conv2d, least_in: int, least_out: int) -> bool:
    """A 3x3, stride 1, padding 1 conv with enough channels for Winograd to beat the direct kernel."""
    return (
        tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and conv.padding == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.in_channels >= least_in
        and conv.out_channels >= least_out
    )


def _conv_params(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int]]:
    if isinstance(conv.padding, str):
        raise BadInput(f"string padding {conv.padding!r} is not supported by the plan")
    return list(conv.padding), list(conv.stride), list(conv.dilation)


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias in `dtype`, an eval-mode BatchNorm folded in (in fp32; exact up to rounding)."""
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    if bn is not None:
        scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
        w = w.float() * scale.view(-1, 1, 1, 1)
        b = (b.float() - bn.running_mean.float()) * scale + bn.bias.detach().float()
    # Cast before any copy: fc6's weight is 411 MB in fp32.
    return w.to(dtype), b.to(dtype)


def max_pool_2x2(x: torch.Tensor, out: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """VGG's 2x2/2 max pool as two elementwise maxima over strided views: the same numbers as
    F.max_pool2d, ~5x faster on channels-last bf16 on CPU (whose pooling kernel is slow there).
    `out` [N, C, H//2, W//2] and `rows` [N, C, H//2, W//2*2] (the row maxima): buffers to reuse."""
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    rows = torch.maximum(x[:, :, 0:h:2, :w], x[:, :, 1:h:2, :w], out=rows)
    return torch.maximum(rows[:, :, :, 0::2], rows[:, :, :, 1::2], out=out)


@dataclass
class Pool:
    """A max pool: VGG's 2x2/2 as max_pool_2x2, any other as its module."""

    kernel: int
    stride: int
    padding: int
    dilation: int
    ceil: bool
    module: nn.Module | None = None
    activations: Activations | None = field(default=None, repr=False)  # for the row maxima

    def out_shape(self, x: torch.Tensor) -> tuple[int, int, int, int] | None:
        """The output's shape where the pool can write into a given buffer (VGG's), else None."""
        return None if self.module is not None else (x.shape[0], x.shape[1], *self.out_size(x.shape[2], x.shape[3]))

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.module is not None:
            return self.module(x)
        rows = (
            None
            if self.activations is None
            else self.activations.get("pool rows", (x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2 * 2), x)
        )
        return max_pool_2x2(x, out, rows)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        k, s, p, d, c = self.kernel, self.stride, self.padding, self.dilation, self.ceil
        return _out_size(h, k, s, p, d, c), _out_size(w, k, s, p, d, c)


class Activations:
    """Buffers for the trunk's large outputs, kept across calls (see FRESH_PAGES_BYTES)."""

    def __init__(self, min_bytes: int = FRESH_PAGES_BYTES, max_bytes: int = MAX_REUSED_BYTES):
        self.min_bytes, self.max_bytes = min_bytes, max_bytes
        self._buffers = winograd.Workspace()

    def get(self, role: str, shape: tuple[int, int, int, int], like: torch.Tensor) -> torch.Tensor | None:
        """A channels-last [N, C, H, W] view of the buffer for `role`, where an output of
        `shape` has min_bytes to max_bytes; else None (allocate it fresh)."""
        if not self.min_bytes <= math.prod(shape) * like.element_size() <= self.max_bytes:
            return None
        n, c, h, w = shape
        return self._buffers.get(role, (n, h, w, c), like).permute(0, 3, 1, 2)

    @property
    def nbytes(self) -> int:
        return self._buffers.nbytes


def zero_outside(x: torch.Tensor, sizes: list[tuple[int, int]]) -> None:
    """Write zeros into each map's padded strips: below row h, and right of column w above it.

    Images of a mixed batch sit top-left in a zero-padded canvas; after a conv (bias, and
    kernels reaching into the image) or an odd-sized pool the strips are no longer zero and
    would leak into the image's border positions at the next layer. Writing the strips costs
    a fraction of a mask multiply (which reads and writes the whole map).
    """
    height, width = x.shape[2], x.shape[3]
    # Neighbours in a planned batch often share a size (same Q and aspect): one write per run
    # of equal heights (row strips) and of equal sizes (column strips) keeps GPU launches few.
    for lo, hi, h in _runs([h for h, _ in sizes]):
        if h < height:
            x[lo:hi, :, h:].zero_()
    for lo, hi, (h, w) in _runs(sizes):
        if w < width:
            x[lo:hi, :, :h, w:].zero_()


def _runs(values: list) -> list[tuple[int, int, object]]:
    """[(start, stop, value)] of the runs of equal consecutive values."""
    runs: list[tuple[int, int, object]] = []
    for i, v in enumerate(values):
        if runs and runs[-1][2] == v:
            runs[-1] = (runs[-1][0], i + 1, v)
        else:
            runs.append((i, i + 1, v))
    return runs


def _first(v) -> int:
    return v[0] if isinstance(v, (tuple, list)) else v


def _out_size(size: int, k: int, s: int, p: int, d: int, ceil: bool = False) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    return (-(-span // s) if ceil else span // s) + 1


class Plan:
    """DenseVGG as steps on one device and dtype: trunk to pool5, head as GEMMs over windows."""

    def __init__(
        self,
        net: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        prepack: bool = True,
        pass_pixels: int | None = None,
        head_rows: int | None = None,
        fast_conv: bool = True,
        reuse_activations: bool = True,
    ):
        """`fast_conv`: on the packed CPU path, run the wide 3x3 convs by Winograd (see
        winograd_algorithm); False keeps oneDNN's direct kernels for every conv.
        `reuse_activations`: on the packed CPU path, write large trunk outputs into buffers kept
        across calls (see FRESH_PAGES_BYTES); False allocates every output afresh."""
        self.device, self.dtype = device, dtype
        self.packed = bool(prepack) and device.type == "cpu" and onednn_prepack_works(dtype)
        self.winograd = self.packed and fast_conv
        self.winograd_channels = winograd_channels(dtype)[:2] if self.winograd else (0, 0)
        self.workspace = winograd.Workspace()
        self.activations = Activations() if self.packed and reuse_activations else None
        self.release_freed_memory = HeapTrimmer()  # call after each batch (CPU)
        cuda = device.type == "cuda"
        self.pass_pixels = pass_pixels or (CUDA_PASS_PIXELS if cuda else CPU_PASS_PIXELS)
        self.head_rows = head_rows or (CUDA_HEAD_ROWS if cuda else CPU_HEAD_ROWS)
        with torch.inference_mode():
            self.trunk = self._lower_trunk(list(net.trunk))
            self.kernel, self.head = self._lower_head(list(net.head))

    # -- lowering ------------------------------------------------------------------------
    def _conv(self, conv: nn.Conv2d, bn, relu: bool, in_size: tuple[int, int, int, int]) -> Conv | WinogradConv:
        padding, stride, dilation = _conv_params(conv)
        if self.winograd and winograd_suits(conv, *self.winograd_channels):
            algorithm = winograd_algorithm(self.dtype)
            w, b = _folded(conv, bn, torch.float32)  # transform in fp32, then round once
            u = winograd.transform_weight(w.to(self.device), algorithm).to(self.dtype)
            # Only the packed copy is kept: U itself is 4x (fp32, F(4x4)) the conv's weight.
            return WinogradConv(winograd.pack(u), b.to(self.device, self.dtype), relu, self.workspace, algorithm)
        w, b = _folded(conv, bn, self.dtype)
        w, b = w.to(self.device).contiguous(memory_format=torch.channels_last), b.to(self.device)
        plain = w if self.packed and self.dtype == torch.float32 else None
        if self.packed:
            w = torch.ops.mkldnn._reorder_convolution_weight(w, padding, stride, dilation, conv.groups, list(in_size))
        return Conv(w, b, tuple(conv.kernel_size), padding, stride, dilation, conv.groups, relu, self.packed, plain)

    def _lower_trunk(self, modules: list[nn.Module]) -> list:
        steps: list = []
        n, _, h, w = NOMINAL_INPUT
        i = 0
        while i < len(modules):
            m = modules[i]
            if isinstance(m, nn.Conv2d):
                bn = modules[i + 1] if i + 1 < len(modules) and isinstance(modules[i + 1], nn.BatchNorm2d) else None
                j = i + 1 + (bn is not None)
                relu = j < len(modules) and isinstance(modules[j], nn.ReLU)
                steps.append(self._conv(m, bn, relu, (n, m.in_channels, h, w)))
                (kh, kw), (p0, p1), (s0, s1), (d0, d1) = m.kernel_size, *_conv_params(m)
                h, w = _out_size(h, kh, s0, p0, d0), _out_size(w, kw, s1, p1, d1)
                i = j + relu
                continue
            if isinstance(m, nn.MaxPool2d):
                k, s, p, d = (_first(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation))
                vgg_pool = (k, s, p, d, m.ceil_mode) == (2, 2, 0, 1, False)
                steps.append(Pool(k, s, p, d, m.ceil_mode, None if vgg_pool else m, self.activations))
                h, w = _out_size(h, k, s, p, d, m.ceil_mode), _out_size(w, k, s, p, d, m.ceil_mode)
            else:  # ReLU without a conv before it, Identity, ...: run the module itself
                steps.append(m)
            i += 1
        return steps

    def _lower_head(self, modules: list[nn.Module]) -> tuple[int, list[Linear]]:
        """fc6 (k x k conv) and later 1x1 convs as GEMMs; rows are windows in (kh, kw, C) order."""
        layers: list[Linear] = []
        kernel = 1
        for i, m in enumerate(modules):
            if isinstance(m, nn.ReLU):
                continue
            if (
                not isinstance(m, nn.Conv2d)
                or m.groups != 1
                or tuple(m.stride) != (1, 1)
                or tuple(m.padding) != (0, 0)
                or tuple(m.dilation) != (1, 1)
                or (layers and m.kernel_size != (1, 1))
                or m.kernel_size[0] != m.kernel_size[1]
            ):
                raise BadInput(f"head module {m} is not a dense fc layer the plan can lower")
            if not layers:
                kernel = m.kernel_size[0]
            relu = i + 1 < len(modules) and isinstance(modules[i + 1], nn.ReLU)
            w, b = _folded(m, None, self.dtype)
            # (out, C, kh, kw) -> (out, kh*kw*C): rows gathered from a channels-last map.
            w = w.to(self.device).permute(0, 2, 3, 1).reshape(m.out_channels, -1).contiguous()
            if self.packed:
                w = torch.ops.mkldnn._reorder_linear_weight(w, None)
            layers.append(Linear(w, b.to(self.device), relu, self.packed, m.out_channels))
        return kernel, layers

    # -- running -------------------------------------------------------------------------
    def pool5(
        self,
        x: torch.Tensor,
        sizes: list[tuple[int, int]] | None = None,
        rezero: bool = True,
        after_step: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The trunk on a channels-last batch in the plan's dtype -> (pool5 maps, valid sizes).

        `sizes` are the images' valid (h, w), each anchored top-left in a zero-padded canvas;
        the padding is zeroed again after every step that can make it non-zero, so every
        image's valid region equals its map computed alone. `rezero=False` (for tests) skips that.
        `after_step(i)` is called once trunk step i is done (benchmarks/layers.py times them).
        """
        full = (x.shape[2], x.shape[3])
        sizes = list(sizes) if sizes is not None else [full] * x.shape[0]
        role = None  # the reused buffer holding x, if any
        last = len(self.trunk) - 1
        for i, step in enumerate(self.trunk):
            if (
                self.activations is not None and i < last and hasattr(step, "out_shape")
            ):  # the last output leaves the plan
                shape = step.out_shape(x)
                target = "b" if role == "a" else "a"  # never x's own buffer
                out = self.activations.get(target, shape, x) if shape is not None else None
                x, role = (step(x), None) if out is None else (step(x, out), target)
            else:  # a module (ReLU, Identity, ...) may hand back x itself: its buffer stays taken
                x = step(x)
            if after_step is not None:
                after_step(i)
            out_size = getattr(step, "out_size", None)
            if out_size is not None:  # convs and pools move the valid region; ReLU etc. keep 0 at 0
                sizes = [out_size(h, w) for h, w in sizes]
                full = out_size(*full)
                if rezero and any(s != full for s in sizes):
                    zero_outside(x, sizes)
        return x, sizes

    def position_sums(
        self, maps: torch.Tensor, sizes: list[tuple[int, int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pool5 maps [B, C, H, W] -> (sum over valid positions of the head's output [B, D] fp32,
        valid positions [B]); a position is valid when its kxk fc6 window lies in the image's
        valid pool5 region (`sizes`, top-left; default: the whole map)."""
        b, c, h, w = maps.shape
        sizes = list(sizes) if sizes is not None else [(h, w)] * b
        if not self.head:
            sums = torch.stack([maps[i, :, :hi, :wi].float().sum(dim=(1, 2)) for i, (hi, wi) in enumerate(sizes)])
            return sums, torch.tensor([hi * wi for hi, wi in sizes], dtype=torch.float32, device=maps.device)
        k = self.kernel
        small = [(hi, wi) for hi, wi in sizes if hi < k or wi < k]
        if small:
            raise BadInput(
                f"pool5 map {small[0][0]}x{small[0][1]} is smaller than fc6's {k}x{k} window; use larger scales"
            )
        # [B, H', W', k, k, C]: a view of the channels-last map; reshaping a slice copies its windows.
        windows = maps.permute(0, 2, 3, 1).unfold(1, k, 1).unfold(2, k, 1).permute(0, 1, 2, 4, 5, 3)
        outs = [(hi - k + 1, wi - k + 1) for hi, wi in sizes]  # valid fc6 positions per image
        out = torch.zeros(b, self.head[-1].out_features, device=maps.device, dtype=torch.float32)
        # Pieces: a few output rows of one image (only its valid columns), <= head_rows rows.
        pieces = [
            (i, r, min(r + max(1, self.head_rows // wo), ho), wo)
            for i, (ho, wo) in enumerate(outs)
            for r in range(0, ho, max(1, self.head_rows // wo))
        ]
        # Greedy chunks of whole pieces, at most head_rows rows (a lone piece may be all one image's).
        chunks: list[list[tuple[int, int, int, int]]] = []
        rows = 0
        for piece in pieces:
            n = (piece[2] - piece[1]) * piece[3]
            if not chunks or rows + n > self.head_rows:
                chunks.append([])
                rows = 0
            chunks[-1].append(piece)
            rows += n
        for chunk in chunks:
            y = torch.empty(
                sum((r1 - r0) * wo for _, r0, r1, wo in chunk), k * k * c, device=maps.device, dtype=maps.dtype
            )
            at = 0
            for i, r0, r1, wo in chunk:  # gather the windows straight into the GEMM's rows
                n = (r1 - r0) * wo
                y[at : at + n].view(r1 - r0, wo, k, k, c).copy_(windows[i, r0:r1, :wo])
                at += n
            for layer in self.head:
                y = layer(y)
            at = 0
            for i, r0, r1, wo in chunk:
                n = (r1 - r0) * wo
                out[i] += y[at : at + n].float().sum(dim=0)
                at += n
        return out, torch.tensor([ho * wo for ho, wo in outs], dtype=torch.float32, device=maps.device)

    def passes(self, x: torch.Tensor) -> list[slice]:
        """The batch's images in trunk passes of at most pass_pixels each (one image at least)."""
        per_pass = max(1, self.pass_pixels // (x.shape[2] * x.shape[3]))
        return [slice(s, s + per_pass) for s in range(0, x.shape[0], per_pass)]

    def __call__(
        self, x: torch.Tensor, sizes: list[tuple[int, int]] | None = None, rezero: bool = True
    ) -> torch.Tensor:
        """Channels-last batch -> fp32 [B, D]: the head's map averaged over valid positions.

        `sizes`: each image's valid (h, w) at the top-left of the zero-padded batch (default:
        all of it). Exact: every image gets the numbers it gets alone (arXiv 1409.1556, Sec. 3.2).
        """
        sizes = list(sizes) if sizes is not None else [(x.shape[2], x.shape[3])] * x.shape[0]
        passes = [self.pool5(x[part], sizes[part], rezero) for part in self.passes(x)]
        maps = passes[0][0] if len(passes) == 1 else torch.cat([m for m, _ in passes])
        sums, positions = self.position_sums(maps, [v for _, vs in passes for v in vs])
        return sums / positions[:, None]
