"""From rescaled images to the paper's descriptor: dense net, spatial mean, flip, scales, L2.

Paper, Appendix B: the fc7 map is averaged over all positions ("global average pooling"),
averaged with the same for the horizontally flipped image, combined over scales by mean
(VOC) or by stacking (Caltech), and L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featx.model import DenseVGG

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown --device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible here; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: featx runs on cpu or cuda[:N]")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPUs are visible; use cuda:0..")
    return dev


class DenseDescriber:
    """Runs the dense net on a batch of same-shape uint8 images; returns flip-averaged means.

    One code path for CPU and GPU: uint8 images travel to the device (pinned, non-blocking on
    CUDA), are normalised there in fp32, then run in the model's precision, channels-last.
    """

    def __init__(
        self,
        net: DenseVGG,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        precision: str = "fp32",
        flip: bool = True,
    ):
        self.device, self.flip = device, flip
        self.dtype = DTYPES[precision]
        self.net = net.to(device=device, dtype=self.dtype, memory_format=torch.channels_last).eval()
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0

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
        pooled = self.net(x).float().mean(dim=(2, 3))
        if self.flip:
            pooled = (pooled[:n] + pooled[n:]) / 2
        return pooled.cpu()


def combine(per_scale: list[torch.Tensor], aggregate: str) -> torch.Tensor:
    """[n, C] per scale -> [n, D]: mean over scales or stacked in the given order, then L2."""
    if aggregate == "mean":
        d = torch.stack(per_scale).mean(dim=0)
    elif aggregate == "stack":
        d = torch.cat(per_scale, dim=1)
    else:
        raise ValueError(f"unknown aggregate {aggregate!r}; use mean or stack")
    return F.normalize(d, p=2, dim=1)
