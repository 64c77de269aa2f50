"""From rescaled images to the paper's descriptor: pooled maps per scale, flip, scales, L2.

Paper, Appendix B: the fc7 map is averaged over all positions ("global average pooling"),
averaged with the same for the horizontally flipped image, combined over scales by mean
(VOC) or by stacking (Caltech), and L2-normalised. The describer (featx.extract.describer)
gives the flip-averaged means of one batch; here batches are planned per scale and combined.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from featx.errors import BadInput
from featx.extract.batching import (
    GRID,
    MAX_MIXING_WASTE,
    SAME_SHAPE,
    BatchStats,
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
) -> list[torch.Tensor]:
    """[n, C] per scale for images rescaled to every Q; mixed sizes share exact batches.

    Batches are planned per Q (featx.extract.batching: by aspect, at most `batch_size` images
    and `batch_pixels` padded pixels, 0 = the device's default); batch n+1 is staged before
    batch n's result is collected. Several describers (one per device) each take every k-th
    batch in a thread of their own, into one output. `on_batch(images, seconds)` is called
    after each batch. With a `failed` dict, a failing batch is retried image by image and each
    failing image's exception recorded there (its rows stay zero); without one, the exception
    propagates. `grid=1, max_waste=0` batches only images of identical shape (for comparison),
    as every net that cannot keep padding out of an image (a ViT's token grid) is batched.
    """
    describers = [describer] if isinstance(describer, DenseDescriber) else list(describer)
    if not describers[0].mixes_sizes:
        grid, max_waste = SAME_SHAPE
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
        describer.release_freed_memory()
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
