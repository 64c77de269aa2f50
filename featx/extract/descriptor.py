"""From rescaled images to the paper's descriptor: dense net, spatial mean, flip, scales, L2.

Paper, Appendix B: the fc7 map is averaged over all positions ("global average pooling"),
averaged with the same for the horizontally flipped image, combined over scales by mean
(VOC) or by stacking (Caltech), and L2-normalised.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Container

import torch
import torch.nn.functional as F

from featx.errors import BadInput
from featx.net.accel import Plan, release_freed_memory
from featx.net.device import DTYPES, resolve_precision
from featx.net.model import DenseVGG


class DenseDescriber:
    """Runs the dense net on a batch of same-shape uint8 images; returns flip-averaged means.

    One code path for CPU and GPU: uint8 images travel to the device (pinned, non-blocking on
    CUDA), are normalised there in fp32, then run channels-last in the model's precision
    through a featx.net.accel.Plan: on a CPU with oneDNN every weight is packed once and ReLU is
    fused (`prepack=False` runs the plain F.conv2d/F.linear kernels that CUDA uses).
    """

    def __init__(
        self,
        net: DenseVGG,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        precision: str = "fp32",
        flip: bool = True,
        *,
        prepack: bool = True,
        pass_pixels: int | None = None,
        head_rows: int | None = None,
    ):
        device = torch.device(device)
        self.device, self.flip = device, flip
        self.precision = resolve_precision(precision, device)
        self.dtype = DTYPES[self.precision]
        # In place, as before: callers that share one net across describers find it moved.
        # Cast first, then pack: the transient copies are then in the (smaller) dtype.
        self.net = net.eval().to(device=device, dtype=self.dtype, memory_format=torch.channels_last)
        self.plan = Plan(self.net, device, self.dtype, prepack, pass_pixels, head_rows)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0

    @property
    def prepacked(self) -> bool:
        return self.plan.packed

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, h, w] -> float32 [B, C] on the CPU: position-averaged map, flip-averaged."""
        n = images.shape[0]
        if self.device.type == "cuda":
            images = images.pin_memory().to(self.device, non_blocking=True)
        x = (images.to(self.device, torch.float32) - self.mean) / self.std
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        pooled = self.plan(x)
        if self.flip:
            pooled = (pooled[:n] + pooled[n:]) / 2
        if self.device.type == "cpu":
            release_freed_memory()
        return pooled.cpu()


def pooled_per_scale(
    describer: DenseDescriber,
    images: list[dict[int, torch.Tensor]],
    scales: tuple[int, ...],
    batch_size: int,
    run_batch: Callable[[int, list[int], torch.Tensor], None] | None = None,
    skip: Container[int] = (),
) -> list[torch.Tensor]:
    """[n, C] per scale for images rescaled to every Q; same-shape images share a batch.

    `run_batch(q, batch, out)` replaces the plain `out[batch] = describer(...)` (featx extract
    uses it to time batches and isolate failing images); indices in `skip` are left at zero.
    """
    n = len(images)
    channels = [m for m in describer.net.modules() if isinstance(m, torch.nn.Conv2d)][-1].out_channels
    per_scale = []
    for q in scales:
        out = torch.zeros(n, channels)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, scaled in enumerate(images):
            if i not in skip:
                groups[tuple(scaled[q].shape)].append(i)
        for _, idx in sorted(groups.items()):
            for s in range(0, len(idx), batch_size):
                batch = idx[s : s + batch_size]
                if run_batch is None:
                    out[batch] = describer(torch.stack([images[i][q] for i in batch]))
                else:
                    run_batch(q, batch, out)
        per_scale.append(out)
    return per_scale


def combine(per_scale: list[torch.Tensor], aggregate: str) -> torch.Tensor:
    """[n, C] per scale -> [n, D]: mean over scales or stacked in the given order, then L2."""
    if aggregate == "mean":
        d = torch.stack(per_scale).mean(dim=0)
    elif aggregate == "stack":
        d = torch.cat(per_scale, dim=1)
    else:
        raise BadInput(f"unknown aggregate {aggregate!r}; use mean or stack")
    return F.normalize(d, p=2, dim=1)
