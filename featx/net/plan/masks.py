"""Per-batch data for the device without stalling it: host tensors moved non-blocking, and each
image's padding zeroed with one masked op per map instead of one write per strip.

On CUDA, `torch.tensor(list, device=cuda)` copies from pageable memory and waits for the
stream, so the host stops queueing work until the GPU is idle; `upload` pins the tensor and
copies it without waiting (the caching host allocator keeps the pinned block until the copy is
done). Zeroing the padding strip by strip costs a launch per run of equal sizes per layer
(featx.net.shapes.zero_outside, the CPU's way: it writes only the strips); PaddingMasks builds
every map size's row and column masks on the host, moves them in one copy, and zeroes a map
with one masked_fill (a few launches per layer whatever the batch holds).
"""

from __future__ import annotations

import torch


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; on CUDA pinned and copied non-blocking (no host sync)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class PaddingMasks:
    """Which positions of a batch are padding, at each map size (canvas, valid sizes) it passes through."""

    def __init__(self, levels: list[tuple[tuple[int, int], list[tuple[int, int]]]], device: torch.device):
        """`levels`: (canvas (H, W), each image's valid (h, w) top-left in it), once per map size."""
        self.index: dict[tuple, int] = {}
        parts: list[torch.Tensor] = []
        spans: list[tuple[int, int, int, int]] = []  # (offset, images, H, W) of each level's rows, then cols
        at = 0
        for canvas, sizes in levels:
            key = (canvas, tuple(sizes))
            if key in self.index:
                continue
            (height, width), n = canvas, len(sizes)
            heights = torch.tensor([h for h, _ in sizes]).view(n, 1)
            widths = torch.tensor([w for _, w in sizes]).view(n, 1)
            parts += [torch.arange(height).view(1, -1) >= heights, torch.arange(width).view(1, -1) >= widths]
            self.index[key] = len(spans)
            spans.append((at, n, height, width))
            at += n * (height + width)
        flat = upload(torch.cat([p.reshape(-1) for p in parts]), device) if parts else None
        self._rows_cols = []
        for offset, n, height, width in spans:
            rows = flat[offset : offset + n * height].view(n, 1, height, 1)
            cols = flat[offset + n * height : offset + n * (height + width)].view(n, 1, 1, width)
            self._rows_cols.append((rows, cols))
        self._masks: dict[int, torch.Tensor] = {}

    def mask(self, canvas: tuple[int, int], sizes: list[tuple[int, int]]) -> torch.Tensor:
        """bool [B, 1, H, W], True on padding (made on the device once per level)."""
        i = self.index[(canvas, tuple(sizes))]
        if i not in self._masks:
            rows, cols = self._rows_cols[i]
            self._masks[i] = rows | cols
        return self._masks[i]

    def zero(self, x: torch.Tensor, sizes: list[tuple[int, int]]) -> None:
        """Zero the padding of x [B, C, H, W] (valid `sizes`) with one masked op."""
        x.masked_fill_(self.mask((x.shape[2], x.shape[3]), sizes), 0)
