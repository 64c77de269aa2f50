"""Exact mixed-size batches for any convnet: each image's numbers as if it ran alone.

Images of one batch sit top-left in a zero-padded canvas (featx.extract.batching). A convnet
keeps the padding out of an image's valid region if, before every layer that mixes positions
(a conv wider than 1x1 or strided, a pool), the positions outside the image hold what the
image alone would see there: zeros for a zero-padded conv or an average pool, -inf for a max
pool. Everything else in these nets works per position (BatchNorm in eval, activations, 1x1
convs, LayerNorm over channels, residual sums, concatenation, squeeze-excitation's scaling),
so what lies outside the image never reaches it; a global average pool inside the net
(squeeze-excitation) is rescaled to the image's valid positions.

Each map's valid extent follows from the layers' own arithmetic (featx.net.shapes): a layer
maps the valid (h, w) of its input to that of its output as it maps the canvas. In these nets
a canvas size names one valid size per image (branches that meet agree on sizes), which is
checked as the batch runs. A layer the hooks cannot follow raises Inexact; a net is then run
on same-shape batches only (featx.extract.batching), which `probe` also checks empirically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from featx.net.shapes import layer_out_size


class Inexact(RuntimeError):
    """The net holds a layer whose padding cannot be kept out of an image's numbers."""


# Layers that mix positions by statistics over the whole map, or resample it.
NOT_PER_POSITION = (nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm, nn.MultiheadAttention, nn.Upsample)


def size_rule(m: nn.Module):
    """(h, w) -> (h', w') of a size-changing layer; None for one that keeps sizes; Inexact if unknown."""
    if isinstance(m, nn.Conv2d):
        if isinstance(m.padding, str) or m.padding_mode != "zeros" or "same" in type(m).__name__.lower():
            # timm's Conv2dSame and kin compute their padding from the input's size: the canvas's, not the image's.
            raise Inexact(f"{type(m).__name__} pads by its input's size or not with zeros")
    elif isinstance(m, nn.AvgPool2d):
        if m.ceil_mode and m.padding and m.count_include_pad and m.divisor_override is None:
            # Alone, a window hanging over the image's edge counts its padding up to h + p only.
            raise Inexact("an average pool in ceil mode that counts its padding")
    elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size, m.output_size)
        if tuple(size) != (1, 1):
            raise Inexact(f"an adaptive pool to {size} splits the canvas, not the image")
        return lambda h, w: (1, 1)
    elif not isinstance(m, nn.MaxPool2d):
        return None
    if layer_out_size(m, 7, 8) == (7, 8) and layer_out_size(m, 8, 7) == (8, 7):
        return None  # stride 1 and as much padding as the window reaches: every size is kept
    return lambda h, w: layer_out_size(m, h, w)


def _same_size(h: int, w: int) -> tuple[int, int]:
    return h, w


def counts_its_window(m: nn.AvgPool2d) -> bool:
    """An average pool whose edge windows divide by the positions they cover (ceil mode, or
    padding left out of the count): an image's edge differs alone and in a larger canvas."""
    return m.divisor_override is None and bool(m.ceil_mode or (m.padding and not m.count_include_pad))


def mixes(m: nn.Module) -> bool:
    """A layer whose output at a position reads other positions of its input."""
    if isinstance(m, nn.Conv2d):
        return any(tuple(v) != (1, 1) for v in (m.kernel_size, m.stride)) or tuple(m.padding) != (0, 0)
    return isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))


@dataclass
class _Batch:
    """What the hooks know while one padded batch runs."""

    valid: dict[tuple[int, int], list[tuple[int, int]]]  # canvas (H, W) -> each image's valid (h, w)
    fill: bool  # False: follow sizes only (tests: what the hooks prevent)
    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # canvas -> outside-the-image


class ExactPadding:
    """Hooks on a convnet trunk that make a padded mixed-size batch exact (see the module doc).

    `run(x, sizes)` -> (output map, each image's valid (h, w) in it). Outside `run` the hooks do
    nothing, so the trunk stays usable as itself. `masks=True` (CUDA) fills the padding with one
    masked write per layer, its mask made once per canvas size and batch, instead of two strided
    writes per image (fewer kernel launches); on a CPU the strips touch less memory.
    """

    def __init__(self, trunk: nn.Module, masks: bool = False):
        self.trunk = trunk
        self.masks = masks
        self._batch: _Batch | None = None
        self._handles = []
        try:
            for m in trunk.modules():
                if isinstance(m, NOT_PER_POSITION):
                    raise Inexact(f"{type(m).__name__} mixes positions by their statistics")
                rule = size_rule(m)
                if rule is None and isinstance(m, nn.AvgPool2d) and counts_its_window(m):
                    rule = _same_size  # keeps sizes, but its edge windows need their divisor corrected
                if mixes(m):
                    self._handles.append(m.register_forward_pre_hook(self._fill))
                if rule is not None:
                    self._handles.append(m.register_forward_hook(self._follow(rule)))
        except Inexact:
            self.close()
            raise

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def run(
        self, x: torch.Tensor, sizes: list[tuple[int, int]], fill: bool = True
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The trunk's map of a padded batch and each image's valid (h, w) in it (`fill=False`:
        the sizes are followed but the padding left as the layers make it)."""
        self._batch = _Batch({(x.shape[2], x.shape[3]): [tuple(s) for s in sizes]}, fill)
        try:
            y = self.trunk(x)
            return y, self._valid(y)
        finally:
            self._batch = None

    def _valid(self, x: torch.Tensor) -> list[tuple[int, int]]:
        try:
            return self._batch.valid[(x.shape[2], x.shape[3])]
        except KeyError:
            raise Inexact(
                f"a {x.shape[2]}x{x.shape[3]} map that no followed layer made: a size changed outside them"
            ) from None

    def _fill(self, m: nn.Module, args):
        batch = self._batch
        if batch is None or not batch.fill:
            return None
        x = args[0]
        sizes = self._valid(x)
        H, W = x.shape[2], x.shape[3]
        if all(s == (H, W) for s in sizes):
            return None
        if isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
            value = -math.inf
            x = x.clone()  # -inf must not reach the tensor's other readers (a residual branch)
        else:
            value = 0.0  # in place: what lies outside an image is no image's number, in any reader
        if self.masks:
            x.masked_fill_(self._outside(batch, sizes, H, W, x.device), value)
        else:
            for i, (h, w) in enumerate(sizes):
                if h < H:
                    x[i, :, h:] = value
                if w < W:
                    x[i, :, :h, w:] = value
        return (x, *args[1:])

    @staticmethod
    def _outside(batch: _Batch, sizes: list[tuple[int, int]], H: int, W: int, device) -> torch.Tensor:
        """[B, 1, H, W] bool: True outside each image; made once per canvas size and batch."""
        outside = batch.masks.get((H, W))
        if outside is None:
            outside = torch.ones(len(sizes), 1, H, W, dtype=torch.bool, device=device)
            for i, (h, w) in enumerate(sizes):
                outside[i, :, :h, :w] = False
            batch.masks[(H, W)] = outside
        return outside

    def _follow(self, rule):
        def hook(module, args, out):
            batch = self._batch
            if batch is None:
                return None
            x = args[0]
            sizes = self._valid(x)
            key = (out.shape[2], out.shape[3])
            new = [rule(h, w) for h, w in sizes]
            old = batch.valid.setdefault(key, new)
            if old != new:
                raise Inexact(f"two maps of {key[0]}x{key[1]} hold images of different sizes")
            H, W = x.shape[2], x.shape[3]
            if not batch.fill or all(s == (H, W) for s in sizes):
                return None
            if isinstance(module, nn.AdaptiveAvgPool2d):
                # The mean over the canvas is the sum over the image (zeros outside) / the canvas.
                scale = torch.tensor([H * W / (h * w) for h, w in sizes], dtype=out.dtype, device=out.device)
                return out * scale.view(-1, 1, 1, 1)
            if isinstance(module, nn.AvgPool2d) and counts_its_window(module):
                # Alone, an edge window divides by the positions inside the image; in the canvas by
                # those inside the canvas: their ratio is the same pool of the image's mask.
                inside = (~self._outside(batch, sizes, H, W, x.device)).to(out.dtype)
                m = module
                share = F.avg_pool2d(inside, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)
                return out / share.clamp_min(torch.finfo(out.dtype).tiny)
            return None

        return hook


def valid_mean(x: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """[B, C, H, W] -> [B, C] fp32: each map's mean over its image's valid positions."""
    H, W = x.shape[2], x.shape[3]
    if all(s == (H, W) for s in sizes):
        return x.mean(dim=(2, 3), dtype=torch.float32)
    return torch.stack([x[i, :, :h, :w].mean(dim=(1, 2), dtype=torch.float32) for i, (h, w) in enumerate(sizes)])


def randomize_(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every per-channel parameter and buffer random values (BatchNorm statistics, biases,
    norm and layer scales), in place: a freshly initialised net keeps its padding at zero through
    many layers (zero biases, unit BN) and ConvNeXt's 1e-6 layer scale makes its blocks nearly
    identities, so a leak of the padding, or a wrong block, would go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*net.named_parameters(), *net.named_buffers()]:
            if not t.is_floating_point() or sum(n > 1 for n in t.shape) != 1:
                continue
            low, high = (0.5, 2.0) if name.endswith("running_var") else (-1.0, 1.0)
            t.copy_(torch.rand(t.shape, generator=g) * (high - low) + low)
    return net


def probe(forward, scale: int = 1, seed: int = 0) -> float:
    """The largest relative difference between two random images batched (padded) and each alone.

    `forward(x, sizes) -> [B, C]`; the images are about 80 x `scale` pixels a side. Used where
    exactness cannot be proven from the layers alone (timm's convnets).
    """
    g = torch.Generator().manual_seed(seed)
    channels = 3
    sizes = [(67 * scale, 94 * scale), (90 * scale, 71 * scale)]
    images = [torch.randn(1, channels, h, w, generator=g) for h, w in sizes]
    canvas = torch.zeros(len(sizes), channels, max(h for h, _ in sizes), max(w for _, w in sizes))
    for i, (h, w) in enumerate(sizes):
        canvas[i, :, :h, :w] = images[i][0]
    with torch.inference_mode():
        alone = torch.cat([forward(x, [s]) for x, s in zip(images, sizes)])
        batched = forward(canvas, sizes)
    scale = alone.abs().max().clamp_min(1e-12)
    return float((batched - alone).abs().max() / scale)
