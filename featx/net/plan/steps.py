"""The steps a lowered plan runs: fused conv (oneDNN packed or plain), Winograd conv, pool, GEMM.

Each trunk step maps a channels-last batch to the next and knows its output size (so the plan
can follow each image's valid region); the large outputs can go into kept buffers (Activations)
instead of fresh pages. Measured reasons for the constants: benchmarks/README.md.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from featx.net.plan import winograd
from featx.net.shapes import out_size

# fp32 convs are packed per input shape (oneDNN's fp32 layout depends on it; see
# featx.net.plan.plan.NOMINAL_INPUT): the packings of the last PACKED_SHAPES shapes are kept.
PACKED_SHAPES = 3
# glibc serves an allocation of >= 32 MB (its largest mmap threshold) from fresh pages and
# unmaps it on free, so an activation that size is page-faulted in again on every call. On the
# packed CPU path such trunk outputs go into reused buffers instead: convs by oneDNN's in-place
# form (out = relu(conv(x) + out) from zeroed memory), pools and Winograd by writing into them.
# Smaller outputs stay fresh: the heap serves them resident, and the in-place form's extra pass
# over `out` would cost more than it saves. CUDA's caching allocator needs neither.
# Measured: benchmarks/README.md ("Reused activation buffers").
FRESH_PAGES_BYTES = 32 << 20
# Larger outputs than this (a lone very large image; a 720k-pixel pass's conv1 output is 92 MB
# in bf16, 184 MB in fp32) stay fresh too, so the plan does not hold such memory for good.
MAX_REUSED_BYTES = 256 << 20


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
            out_size(h, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0]),
            out_size(w, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1]),
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
            if out is not None:  # oneDNN's in-place form, out = relu(conv(x) + out), from zero
                return self._sum_into(x, out.zero_())
            return self._packed(x, "relu" if self.relu else "none")
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.relu_(x) if self.relu else x

    def add_into(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """conv(x) + `other` [then ReLU] (a residual block's end), written into `other` where
        oneDNN's in-place form runs (packed; `other` channels-last, of out_shape(x)), else fresh."""
        if self.packed and other.is_contiguous(memory_format=torch.channels_last) and other.dtype == x.dtype:
            return self._sum_into(x, other)
        if self.packed:
            y = self._packed(x, "none")
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        y = y.add_(other)
        return F.relu_(y) if self.relu else y

    def _packed(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        w = self.packed_for(tuple(x.shape))
        args = (self.bias, self.padding, self.stride, self.dilation, self.groups)
        return torch.ops.mkldnn._convolution_pointwise(x, w, *args, activation, [], "")

    def _sum_into(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """oneDNN's in-place form: other = conv(x) + other [then ReLU]."""
        w = self.packed_for(tuple(x.shape))
        args = (self.bias, self.padding, self.stride, self.dilation, self.groups)
        relu = "relu" if self.relu else None
        return torch.ops.mkldnn._convolution_pointwise_.binary(other, x, w, *args, "add", None, relu, [], None)


@dataclass
class WinogradConv:
    """A 3x3 conv (stride 1, padding 1) [+ folded BN] [+ ReLU] by Winograd (featx.net.plan.winograd)."""

    weights: list[torch.Tensor] = field(repr=False)  # the transformed kernel: winograd.gemm_weights, packed
    bias: torch.Tensor  # fp32
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
    """A position-wise layer as a GEMM over rows [+ its activation: "relu", "gelu" (exact, erf), "none"]."""

    weight: torch.Tensor  # packed, or plain [out, in]
    bias: torch.Tensor
    activation: str
    packed: bool
    out_features: int

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        if self.packed:
            algorithm = "none" if self.activation == "gelu" else ""  # GELU's: erf, not tanh
            return torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, self.activation, [], algorithm)
        y = F.linear(rows, self.weight, self.bias)
        if self.activation == "relu":
            return F.relu_(y)
        return F.gelu(y) if self.activation == "gelu" else y


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
        return out_size(h, k, s, p, d, c), out_size(w, k, s, p, d, c)


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
