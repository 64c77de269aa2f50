"""A dense VGG lowered to fused steps on one device and dtype: the fast form of its forward_pooled.

The paper's dense evaluation (arXiv 1409.1556, Sec. 3.2) makes fc6 a 7x7 convolution over
pool5; a 7x7 convolution without padding is one GEMM over the 7x7 windows of its input, and
fc7 (1x1) a GEMM over positions. So the plan is: the conv trunk (conv [+ BN folded] + ReLU
fused, max pools), then fc6/fc7 as GEMMs over row chunks of pool5 windows, summed per image.

Why not just call the module: in eager mode oneDNN re-lays out every convolution weight on
every call and ReLU is a separate pass over memory. On a CPU with oneDNN the plan packs every
weight once, in the kernel's blocked layout, and fuses ReLU into the op; elsewhere (CUDA, or
`prepack=False`) the same steps run as plain F.conv2d / F.linear (cuDNN / cuBLAS), which tests
on CPU cover. The measurements behind the constants below: benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from featx.errors import BadInput
from featx.net.plan import winograd, winograd_kernels
from featx.net.plan.masks import PaddingMasks, upload
from featx.net.plan.onednn import onednn_prepack_works
from featx.net.plan.steps import Activations, Conv, Linear, Pool, WinogradConv
from featx.net.shapes import layer_out_size, zero_outside

# A nominal trunk input (image and its flip at Q=384, 4:3) for packing conv weights once. In
# bf16 oneDNN's blocked layout for these convs does not depend on the spatial size; in fp32 it
# does (a conv packed for another shape runs several times slower: benchmarks/README.md,
# "Packing fp32 weights per shape"), so fp32 convs are packed per input shape (steps.PACKED_SHAPES).
NOMINAL_INPUT = (2, 3, 384, 512)
# Pixels per trunk pass. On a CPU a larger batch gains nothing (a conv's GEMM already has
# h*w rows) but costs memory (conv1 at 64 channels); on a GPU batches fill the device.
CPU_PASS_PIXELS = 2 * 512 * 704
CUDA_PASS_PIXELS = 32 * 512 * 704
# Winograd for a 3x3 conv on the CPU: F(4x4, 3x3) in fp32, F(2x2, 3x3) in bf16/fp16 (see
# winograd_algorithm), from these input and output channel counts, by algorithm and whether its
# transforms run compiled (featx.net.plan.winograd_kernels) or as torch ops: where it beat
# oneDNN's direct kernel (benchmarks/README.md, "Winograd from how many channels").
WINOGRAD_MIN_CHANNELS = {
    (winograd.F2, True): (64, 64),
    (winograd.F4, True): (64, 128),
    (winograd.F2, False): (128, 128),
    (winograd.F4, False): (128, 128),
}
# Rows (window positions) per head GEMM: ~1k rows keep fc6 compute-bound on a CPU (weight
# read once per chunk) while the window matrix stays ~50 MB in bf16.
CPU_HEAD_ROWS = 1024
CUDA_HEAD_ROWS = 8192


def winograd_algorithm(dtype: torch.dtype) -> winograd.Algorithm:
    """F(4x4, 3x3) in fp32; F(2x2, 3x3) in bf16/fp16, where F(4x4)'s coefficients cost 5x F(2x2)'s error."""
    return winograd.F4 if dtype == torch.float32 else winograd.F2


def winograd_channels(dtype: torch.dtype) -> tuple[int, int, bool]:
    """(least input channels, least output channels, transforms compiled) for Winograd in `dtype`
    on this machine (builds featx.net.plan.winograd_kernels on first use)."""
    algorithm = winograd_algorithm(dtype)
    wide = winograd.wide_components(algorithm, dtype)
    compiled = winograd_kernels.kernels(algorithm, dtype, wide) is not None
    return (*WINOGRAD_MIN_CHANNELS[(algorithm, compiled)], compiled)


def conv_kernels(device: torch.device, dtype: torch.dtype) -> str:
    """In words, which kernels a default Plan runs the convolutions with (for provenance)."""
    if device.type == "cpu" and onednn_prepack_works(dtype):
        least_in, least_out, compiled = winograd_channels(dtype)
        algorithm = winograd_algorithm(dtype)
        wide = winograd.wide_components(algorithm, dtype)
        return (
            f"oneDNN, weights pre-packed; 3x3 convs of >= {least_in} -> {least_out} channels by Winograd "
            f"{algorithm.name}"
            + (f" ({len(wide)} of its {algorithm.t**2} products in fp32)" if wide else "")
            + f", transforms {'compiled' if compiled else 'by torch ops'}"
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
        raise ValueError(f"string padding {conv.padding!r} is not supported by the plan")
    return list(conv.padding), list(conv.stride), list(conv.dilation)


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias in `dtype`, an eval-mode BatchNorm folded in (in fp32; exact up to rounding)."""
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    if bn is not None:
        scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
        w = w.float() * scale.view(-1, 1, 1, 1)
        b = (b.float() - bn.running_mean.float()) * scale + bn.bias.detach().float()
    # Cast before any copy: fc6's weight is 411 MB in fp32.
    return w.to(dtype), b.to(dtype)


def lower_conv(
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d | None,
    relu: bool,
    device: torch.device,
    dtype: torch.dtype,
    packed: bool,
    in_size: tuple[int, int, int, int],
    per_shape: bool | None = None,
) -> Conv:
    """conv [+ BN folded] [+ ReLU] as one step on `device` in `dtype`: oneDNN's fused kernel with
    the weights packed for an input of `in_size` where `packed`, else F.conv2d and relu_.
    `per_shape` (default: in fp32) packs them again for each input shape (steps.Conv keeps the
    plain weight): the layout oneDNN's kernel wants may depend on the shape (benchmarks/README.md)."""
    padding, stride, dilation = _conv_params(conv)
    w, b = folded(conv, bn, dtype)
    w, b = w.to(device).contiguous(memory_format=torch.channels_last), b.to(device)
    per_shape = dtype == torch.float32 if per_shape is None else per_shape
    plain = w if packed and per_shape else None
    if packed:
        w = torch.ops.mkldnn._reorder_convolution_weight(w, padding, stride, dilation, conv.groups, list(in_size))
    return Conv(w, b, tuple(conv.kernel_size), padding, stride, dilation, conv.groups, relu, packed, plain)


def _first(v) -> int:
    return v[0] if isinstance(v, (tuple, list)) else v


class Plan:
    """A dense VGG (`trunk` to pool5, `head` of fc layers as convs) as steps on one device and
    dtype: the trunk's fused steps, the head as GEMMs over windows. Called like the net's
    forward_pooled, with the same numbers (fp32: to 1e-5)."""

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
        zeroing: str | None = None,
    ):
        """`fast_conv`: on the packed CPU path, run the wide 3x3 convs by Winograd (see
        winograd_algorithm); False keeps oneDNN's direct kernels for every conv.
        `reuse_activations`: on the packed CPU path, write large trunk outputs into buffers kept
        across calls (see steps.FRESH_PAGES_BYTES); False allocates every output afresh.
        `zeroing`: how the padding is zeroed after a step, "strips" (featx.net.shapes.zero_outside:
        writes only the padding, a launch per run of equal sizes) or "masks" (one masked op per
        step, featx.net.plan.masks); default strips on a CPU, masks on CUDA (launches matter)."""
        self.device, self.dtype = device, dtype
        self.packed = bool(prepack) and device.type == "cpu" and onednn_prepack_works(dtype)
        self.winograd = self.packed and fast_conv
        self.winograd_channels = winograd_channels(dtype)[:2] if self.winograd else (0, 0)
        self.workspace = winograd.Workspace()
        self.activations = Activations() if self.packed and reuse_activations else None
        cuda = device.type == "cuda"
        self.zeroing = zeroing or ("masks" if cuda else "strips")
        if self.zeroing not in ("strips", "masks"):
            raise BadInput(f"zeroing {zeroing!r} is not strips or masks")
        self.pass_pixels = pass_pixels or (CUDA_PASS_PIXELS if cuda else CPU_PASS_PIXELS)
        self.head_rows = head_rows or (CUDA_HEAD_ROWS if cuda else CPU_HEAD_ROWS)
        with torch.inference_mode():
            self.trunk = self._lower_trunk(list(net.trunk))
            self.kernel, self.head = self._lower_head(list(net.head))

    # -- lowering ------------------------------------------------------------------------
    def _conv(self, conv: nn.Conv2d, bn, relu: bool, in_size: tuple[int, int, int, int]) -> Conv | WinogradConv:
        if self.winograd and winograd_suits(conv, *self.winograd_channels):
            algorithm = winograd_algorithm(self.dtype)
            w, b = folded(conv, bn, torch.float32)  # transform in fp32, then round once
            u = winograd.transform_weight(w.to(self.device), algorithm)
            # Only the packed copy is kept: U itself is 4x (fp32, F(4x4)) the conv's weight. The
            # bias stays fp32: it rides on a product that is fp32 in bf16 (Algorithm.wide).
            weights = winograd.gemm_weights(u, self.dtype, algorithm, packed=True)
            return WinogradConv(weights, b.to(self.device), relu, self.workspace, algorithm)
        return lower_conv(conv, bn, relu, self.device, self.dtype, self.packed, in_size)

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
                h, w = layer_out_size(m, h, w)
                i = j + relu
                continue
            if isinstance(m, nn.MaxPool2d):
                k, s, p, d = (_first(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation))
                vgg_pool = (k, s, p, d, m.ceil_mode) == (2, 2, 0, 1, False)
                steps.append(Pool(k, s, p, d, m.ceil_mode, None if vgg_pool else m, self.activations))
                h, w = layer_out_size(m, h, w)
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
                raise ValueError(f"head module {m} is not a dense fc layer the plan can lower")
            if not layers:
                kernel = m.kernel_size[0]
            relu = i + 1 < len(modules) and isinstance(modules[i + 1], nn.ReLU)
            w, b = folded(m, None, self.dtype)
            # (out, C, kh, kw) -> (out, kh*kw*C): rows gathered from a channels-last map.
            w = w.to(self.device).permute(0, 2, 3, 1).reshape(m.out_channels, -1).contiguous()
            if self.packed:
                w = torch.ops.mkldnn._reorder_linear_weight(w, None)
            layers.append(Linear(w, b.to(self.device), "relu" if relu else "none", self.packed, m.out_channels))
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
        masks = PaddingMasks(self.padded_levels(full, sizes), x.device) if rezero and self.zeroing == "masks" else None
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
                    if masks is None:
                        zero_outside(x, sizes)
                    else:
                        masks.zero(x, sizes)
        return x, sizes

    def padded_levels(
        self, full: tuple[int, int], sizes: list[tuple[int, int]]
    ) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
        """(canvas, valid sizes) after each trunk step that leaves some image padded: where pool5 zeroes."""
        levels = []
        for step in self.trunk:
            out_size = getattr(step, "out_size", None)
            if out_size is not None:
                sizes = [out_size(h, w) for h, w in sizes]
                full = out_size(*full)
                if any(s != full for s in sizes):
                    levels.append((full, sizes))
        return levels

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
            return sums, self.positions([hi * wi for hi, wi in sizes], maps.device)
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
        return out, self.positions([ho * wo for ho, wo in outs], maps.device)

    @staticmethod
    def positions(counts: list[int], device: torch.device) -> torch.Tensor:
        """Valid positions per image as fp32 on `device`, built on the host and moved without a
        host sync (torch.tensor(list, device=cuda) would wait for the GPU: featx.net.plan.masks)."""
        return upload(torch.tensor(counts, dtype=torch.float32), device)

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
