"""From rescaled images to the paper's descriptor: pooled maps per scale, flip, scales, L2.

Paper, Appendix B: the fc7 map is averaged over all positions ("global average pooling"),
averaged with the same for the horizontally flipped image, combined over scales by mean
(VOC) or by stacking (Caltech), and L2-normalised. The describer (featx.extract.describer)
gives the flip-averaged means of one batch; here batches are planned per scale and combined.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from featx.errors import DeviceFailed
from featx.extract.batching import (
    GRID,
    MAX_MIXING_WASTE,
    SAME_SHAPE,
    Batch,
    BatchStats,
    bucket_batches,
    default_batch_pixels,
    padded_size,
    plan_batches,
)
from featx.extract.describer import DenseDescriber, Staged

__all__ = ["combine", "pooled_per_scale"]


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
    buckets: bool | None = None,
) -> list[torch.Tensor]:
    """[n, C] per scale for images rescaled to every Q; mixed sizes share exact batches.

    Batches are planned per Q (featx.extract.batching: at most `batch_size` images and
    `batch_pixels` padded pixels, 0 = the device's default): by aspect on a CPU, in `buckets`
    of few shapes on CUDA (None: by the device; False on CUDA for comparison); batch n+1 is
    staged before batch n's result is collected. Several describers (one per device) each take
    every k-th batch in a thread of their own, into one output. `on_batch(images, seconds)` is
    called after each batch. A batch that runs out of device memory is freed and run in halves
    (down to one image). With a `failed` dict, a batch failing otherwise is retried image by
    image and each failing image's exception recorded there (its rows stay zero); without one,
    the exception propagates. A device that stops working raises DeviceFailed, whatever
    `failed`. `grid=1, max_waste=0` batches only images of identical shape (for comparison),
    as every net that cannot keep padding out of an image (a ViT's token grid) is batched,
    never in buckets.
    """
    describers = [describer] if isinstance(describer, DenseDescriber) else list(describer)
    mixes_sizes = describers[0].mixes_sizes
    if not mixes_sizes:
        grid, max_waste = SAME_SHAPE
    n = len(images)
    out = {q: torch.zeros(n, describers[0].channels) for q in scales}
    max_pixels = batch_pixels or default_batch_pixels(describers[0].device.type)
    # Buckets pad images to shared canvases: only for a net that keeps the padding out.
    bucketed = mixes_sizes and (describers[0].cuda if buckets is None else buckets)
    work: list[tuple[int, Batch]] = []
    for q in scales:
        sizes = [tuple(images[i][q].shape[1:]) for i in range(n)]
        if bucketed:
            work += [(q, b) for b in bucket_batches(sizes, batch_size, max_pixels)]
            continue
        for batch in plan_batches(sizes, batch_size, max_pixels, grid=grid, max_waste=max_waste):
            work.append((q, Batch(batch, padded_size([sizes[i] for i in batch], grid), len(batch))))
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
        q, batch = work[k]
        try:
            return describer.stage([images[i][q] for i in batch.images], batch.canvas, batch.slots)
        except Exception:  # staged again by its own turn, where a lasting error is that batch's
            return None

    with describer.settings():  # the process's CUDA flags stay set for the whole loop
        staged = stage(0)
        memory = _Memory()
        for k, (q, batch) in enumerate(work):
            t = time.perf_counter()
            current, staged = staged, None
            with lock:
                alive = [i for i in batch.images if failed is None or i not in failed]
            if len(alive) < len(batch.images):  # an image failed at an earlier Q: not again
                current = None
            if alive and not memory.fits(batch):
                staged = stage(k + 1)
                _in_parts(describer, images, q, alive, batch, out[q], failed, lock, memory, halves=True)
            elif alive:
                error = None
                try:
                    current = current or describer.stage([images[i][q] for i in alive], batch.canvas, batch.slots)
                    result = describer.run(current)
                    staged = stage(k + 1)  # host padding and copy overlap this batch's compute
                    rows = result.cpu()
                    with lock:
                        out[q][alive] = rows
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:
                    error = _handled(describer, e, failed)
                current = result = None  # the failed batch's tensors, freed before its retry
                if error is not None:
                    staged = staged or stage(k + 1)
                    oom = _out_of_memory(error)
                    if oom:
                        memory.ran_out(batch)
                    _in_parts(describer, images, q, alive, batch, out[q], failed, lock, memory, halves=oom)
            else:
                staged = stage(k + 1)
            describer.release_freed_memory()
            with lock:
                if stats is not None and alive:
                    stats.add([tuple(images[i][q].shape[1:]) for i in alive], batch.canvas, batch.slots)
                if on_batch is not None:
                    on_batch(len(alive), time.perf_counter() - t)


class _Memory:
    """The padded pixels per batch at which a device ran out of memory: larger batches go in halves at once."""

    def __init__(self):
        self.ceiling: int | None = None

    @staticmethod
    def pixels(batch: Batch) -> int:
        return batch.slots * batch.canvas[0] * batch.canvas[1]

    def fits(self, batch: Batch) -> bool:
        return self.ceiling is None or self.pixels(batch) < self.ceiling or batch.slots == 1

    def ran_out(self, batch: Batch) -> None:
        self.ceiling = min(self.ceiling or self.pixels(batch), self.pixels(batch))


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError)


def _handled(describer: DenseDescriber, e: Exception, failed: dict | None) -> Exception:
    """A batch's exception, kept without its traceback (whose frames hold the batch's device
    tensors); or DeviceFailed when the device stopped working; or raised again when the caller
    takes no failures and it is not a lack of memory (which smaller batches may cure)."""
    if not _out_of_memory(e):
        if not describer.device_works():
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DeviceFailed(
                f"{describer.device} stopped working ({first}); the images described before it are kept: "
                f"run again to go on (on CUDA: after checking the GPU, e.g. with nvidia-smi)"
            ) from e
        if failed is None:
            raise e
    traceback.clear_frames(e.__traceback__)
    return e.with_traceback(None)


def _in_parts(describer, images, q, members, batch: Batch, out, failed, lock, memory: _Memory, halves: bool) -> None:
    """Run a batch's images again: in halves of its canvas after running out of memory (one
    image that still does not fit fails), else one by one (one image's failure must not cost
    the others their rows)."""
    if halves:
        cut = (len(members) + 1) // 2
        slots = max(cut, (batch.slots + 1) // 2)
        parts = [Batch(members[:cut], batch.canvas, slots), Batch(members[cut:], batch.canvas, slots)]
    else:
        parts = [Batch([i], tuple(images[i][q].shape[1:]), 1) for i in members]
    for part in parts:
        if not part.images:
            continue
        if halves and not memory.fits(part):
            _in_parts(describer, images, q, part.images, part, out, failed, lock, memory, halves=True)
            continue
        error = None
        try:
            staged = describer.stage([images[i][q] for i in part.images], part.canvas, part.slots)
            rows = describer.run(staged).cpu()
            with lock:
                out[part.images] = rows
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            error = _handled(describer, e, failed)
        staged = None
        if error is None:
            continue
        if _out_of_memory(error) and len(part.images) > 1:
            memory.ran_out(part)
            _in_parts(describer, images, q, part.images, part, out, failed, lock, memory, halves=True)
        elif failed is None:
            raise error
        elif len(part.images) > 1:
            _in_parts(describer, images, q, part.images, part, out, failed, lock, memory, halves=False)
        else:
            with lock:
                failed[part.images[0]] = error


def combine(per_scale: list[torch.Tensor], aggregate: str) -> torch.Tensor:
    """[n, C] per scale -> [n, D]: mean over scales or stacked in the given order, then L2."""
    if aggregate == "mean":
        d = torch.stack(per_scale).mean(dim=0)
    elif aggregate == "stack":
        d = torch.cat(per_scale, dim=1)
    else:
        raise ValueError(f"unknown aggregate {aggregate!r}; use mean or stack")
    return F.normalize(d, p=2, dim=1)
