"""From rescaled images to the paper's descriptor: dense net, spatial mean, flip, scales, L2.

Paper, Appendix B: the fc7 map is averaged over all positions ("global average pooling"),
averaged with the same for the horizontally flipped image, combined over scales by mean
(VOC) or by stacking (Caltech), and L2-normalised.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featx.errors import BadInput
from featx.extract.batching import (
    GRID,
    MAX_MIXING_WASTE,
    BatchStats,
    default_batch_pixels,
    padded_size,
    plan_batches,
)
from featx.net.accel import Plan
from featx.net.device import DTYPES, resolve_precision
from featx.net.model import DenseVGG


@dataclass
class Staged:
    """A batch on its way to the device: uint8 canvas [n, 3, H, W], valid sizes, copy event."""

    pixels: torch.Tensor
    sizes: list[tuple[int, int]]
    ready: object = None  # a torch.cuda.Event on CUDA


class DenseDescriber:
    """Runs the dense net on a batch of uint8 images of any sizes; returns flip-averaged means.

    One code path for CPU and GPU: images are padded (uint8, top-left) into one canvas in
    host memory (pinned on CUDA, copied non-blocking on a side stream so the copy of batch
    n+1 overlaps the compute of batch n), normalised on the device in fp32, the padding set
    to zero after normalising, flipped per image (each flip anchored top-left too), then run
    channels-last in the model's precision through a featx.net.accel.Plan, which keeps the
    padding out of every image's numbers. On a CPU with oneDNN every weight is packed once
    and ReLU is fused (`prepack=False` runs the plain F.conv2d/F.linear kernels CUDA uses).
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
        self.cuda = device.type == "cuda"
        self.copies = torch.cuda.Stream(device) if self.cuda else None

    @property
    def prepacked(self) -> bool:
        return self.plan.packed

    @property
    def channels(self) -> int:
        return [m for m in self.net.modules() if isinstance(m, torch.nn.Conv2d)][-1].out_channels

    def stage(self, images: torch.Tensor | list[torch.Tensor], canvas: tuple[int, int] | None = None) -> Staged:
        """Pad uint8 [3, h, w] images top-left into one canvas (default: the largest h and w)
        and start its copy to the device."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            host, sizes = images, [tuple(images.shape[2:])] * images.shape[0]
        else:
            sizes = [(int(t.shape[1]), int(t.shape[2])) for t in images]
            h, w = canvas or (max(h for h, _ in sizes), max(w for _, w in sizes))
            if any(hi > h or wi > w for hi, wi in sizes):
                raise BadInput(f"canvas {h}x{w} is smaller than an image of the batch ({sizes})")
            host = torch.zeros(len(sizes), 3, h, w, dtype=torch.uint8, pin_memory=self.cuda)
            for i, t in enumerate(images):
                host[i, :, : sizes[i][0], : sizes[i][1]] = t
        if not self.cuda:
            return Staged(host, sizes)
        host = host if host.is_pinned() else host.pin_memory()
        with torch.cuda.stream(self.copies):
            pixels = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copies)
        return Staged(pixels, sizes, ready)

    def run(self, staged: Staged, rezero: bool = True) -> torch.Tensor:
        """The batch's [n, C] fp32 descriptors, left on the device (asynchronous on CUDA)."""
        with torch.inference_mode(), self._cuda_flags():
            return self._run(staged, rezero)

    @contextmanager
    def _cuda_flags(self):
        """On CUDA: cuDNN autotuning (the planner keeps batch shapes few) and, in fp32, no TF32
        (its 10-bit mantissa would make fp32 inexact). Restored afterwards; nothing on a CPU."""
        if not self.cuda:
            yield
            return
        fp32 = self.dtype == torch.float32
        matmul = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = matmul and not fp32
            with torch.backends.cudnn.flags(
                enabled=True, benchmark=True, deterministic=torch.backends.cudnn.deterministic, allow_tf32=not fp32
            ):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul

    def _run(self, staged: Staged, rezero: bool) -> torch.Tensor:
        if staged.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(staged.ready)
            staged.pixels.record_stream(torch.cuda.current_stream(self.device))
        u8, sizes = staged.pixels, staged.sizes
        n, (height, width) = len(sizes), u8.shape[2:]
        x = (u8.to(self.device, torch.float32) - self.mean) / self.std
        batch = torch.empty(
            n * (2 if self.flip else 1),
            3,
            height,
            width,
            device=self.device,
            dtype=self.dtype,
            memory_format=torch.channels_last,
        ).zero_()
        # Padding after normalising (raw zeros would be -mean/std); each flip flips the image
        # itself, so it is anchored top-left like the image.
        for i, (h, w) in enumerate(sizes):
            batch[i, :, :h, :w] = x[i, :, :h, :w]
            if self.flip:
                batch[n + i, :, :h, :w] = x[i, :, :h, :w].flip(-1)
        pooled = self.plan(batch, sizes * (2 if self.flip else 1), rezero)
        if self.flip:
            pooled = (pooled[:n] + pooled[n:]) / 2
        return pooled

    def __call__(
        self, images: torch.Tensor | list[torch.Tensor], canvas: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """uint8 [B, 3, h, w] (or a list of [3, h_i, w_i]) -> float32 [B, C] on the CPU:
        position-averaged map, flip-averaged, each image exactly as if it ran alone."""
        pooled = self.run(self.stage(images, canvas)).cpu()
        if not self.cuda:
            self.plan.release_freed_memory()
        return pooled


def pooled_per_scale(
    describer: DenseDescriber | Sequence[DenseDescriber],
    images: list[dict[int, torch.Tensor]],
    scales: tuple[int, ...],
    batch_size: int,
    *,
    batch_pixels: int = 0,
    on_batch: Callable[[int, float], None] | None = None,
    failed: dict[int, Exception] | None = None,
    stats: BatchStats | None = None,
    grid: int = GRID,
    max_waste: float = MAX_MIXING_WASTE,
) -> list[torch.Tensor]:
    """[n, C] per scale for images rescaled to every Q; mixed sizes share exact batches.

    Batches are planned per Q (featx.extract.batching: by aspect, at most `batch_size` images
    and `batch_pixels` padded pixels, 0 = the device's default); batch n+1 is staged before
    batch n's result is collected. Several describers (one per device) each take every k-th
    batch in a thread of their own, into one output. `on_batch(images, seconds)` is called
    after each batch. With a `failed` dict, a failing batch is retried image by image and each
    failing image's exception recorded there (its rows stay zero); without one, the exception
    propagates. `grid=1, max_waste=0` batches only images of identical shape (for comparison).
    """
    describers = [describer] if isinstance(describer, DenseDescriber) else list(describer)
    n = len(images)
    out = {q: torch.zeros(n, describers[0].channels) for q in scales}
    max_pixels = batch_pixels or default_batch_pixels(describers[0].device.type)
    work: list[tuple[int, list[int], tuple[int, int]]] = []
    for q in scales:
        sizes = [tuple(images[i][q].shape[1:]) for i in range(n)]
        for batch in plan_batches(sizes, batch_size, max_pixels, grid=grid, max_waste=max_waste):
            work.append((q, batch, padded_size([sizes[i] for i in batch], grid)))
    lock = threading.Lock()  # guards out, failed, stats and on_batch across device threads
    if len(describers) == 1:
        _drive(describers[0], images, work, out, failed, stats, on_batch, lock)
    else:
        with ThreadPoolExecutor(len(describers), thread_name_prefix="featx-device") as pool:
            shares = [
                pool.submit(_drive, d, images, work[k :: len(describers)], out, failed, stats, on_batch, lock)
                for k, d in enumerate(describers)
            ]
            for share in shares:
                share.result()
    return [out[q] for q in scales]


def _drive(describer: DenseDescriber, images, work, out, failed, stats, on_batch, lock) -> None:
    """Run `work`'s batches on one describer in order, staging each next batch early."""

    def stage(k: int) -> Staged | None:
        if k >= len(work):
            return None
        q, batch, canvas = work[k]
        return describer.stage([images[i][q] for i in batch], canvas)

    staged = stage(0)
    for k, (q, batch, canvas) in enumerate(work):
        t = time.perf_counter()
        current, staged = staged, None
        with lock:
            alive = [i for i in batch if failed is None or i not in failed]
        try:
            if len(alive) < len(batch):  # an image failed at an earlier Q: not again
                current = describer.stage([images[i][q] for i in alive], canvas) if alive else None
            result = describer.run(current) if current is not None else None
            staged = stage(k + 1)  # host padding and copy overlap this batch's compute
            if result is not None:
                result = result.cpu()
                with lock:
                    out[q][alive] = result
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            if failed is None:
                raise
            staged = staged or stage(k + 1)
            _one_by_one(describer, images, q, alive, out[q], failed, e, lock)
        if describer.device.type == "cpu":
            describer.plan.release_freed_memory()
        with lock:
            if stats is not None and alive:
                stats.add([tuple(images[i][q].shape[1:]) for i in alive], canvas)
            if on_batch is not None:
                on_batch(len(alive), time.perf_counter() - t)


def _one_by_one(describer, images, q, batch, out, failed, error, lock) -> None:
    if len(batch) == 1:
        with lock:
            failed[batch[0]] = error
        return
    for i in batch:  # one image's failure must not cost the others their rows
        try:
            row = describer([images[i][q]])
            with lock:
                out[[i]] = row
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            with lock:
                failed[i] = e


def combine(per_scale: list[torch.Tensor], aggregate: str) -> torch.Tensor:
    """[n, C] per scale -> [n, D]: mean over scales or stacked in the given order, then L2."""
    if aggregate == "mean":
        d = torch.stack(per_scale).mean(dim=0)
    elif aggregate == "stack":
        d = torch.cat(per_scale, dim=1)
    else:
        raise BadInput(f"unknown aggregate {aggregate!r}; use mean or stack")
    return F.normalize(d, p=2, dim=1)
