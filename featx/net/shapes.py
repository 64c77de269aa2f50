"""Where the images of a padded batch are valid: layer output sizes, and zeroing the padding.

Images of a mixed batch sit top-left in one zero-padded canvas (featx.extract.batching); each
spatial layer moves an image's valid region by the same arithmetic as its output size, and the
padding must be zero again before the next layer reads it. The one place featx computes a
conv's or pool's output size: the layer tables, the dense nets and the lowered plan use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


def out_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1, ceil: bool = False) -> int:
    """Output length of a conv or pool along one axis (torch's formula, floor or ceil mode)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + padding:  # torch: the last window must start inside
        out -= 1
    return out


def _pair(v) -> tuple[int, int]:
    return (v[0], v[1]) if isinstance(v, (tuple, list)) else (v, v)


def layer_out_size(m: nn.Module, height: int, width: int) -> tuple[int, int] | None:
    """(h, w) out of a Conv2d, MaxPool2d or AvgPool2d for an h x w input; None for a layer that keeps
    the size and keeps zeros at zero (ReLU, Identity, ...). BatchNorm keeps the size but not the zeros:
    see `spoils_padding`."""
    from torch import nn

    if isinstance(m, nn.Conv2d):
        if isinstance(m.padding, str):
            raise ValueError(f"string padding {m.padding!r}: featx needs the conv's padding in pixels")
        ceil = False
    elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        ceil = m.ceil_mode
    else:
        return None
    (kh, kw), (sh, sw) = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
    (ph, pw), (dh, dw) = _pair(m.padding), _pair(getattr(m, "dilation", 1))
    return out_size(height, kh, sh, ph, dh, ceil), out_size(width, kw, sw, pw, dw, ceil)


def spoils_padding(m: nn.Module) -> bool:
    """Whether the layer can make the zero padding non-zero (a conv's bias, BatchNorm's shift, a pool's reach)."""
    from torch import nn

    return isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d))


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
