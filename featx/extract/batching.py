"""Which images share a forward pass: mixed sizes, ordered by aspect, capped, few shapes.

Images of one scale Q but different sizes share a batch: each sits top-left in a zero-padded
canvas and the net keeps the padding out of every image's numbers (VGG's featx.net.plan.Plan,
other convnets' featx.net.padding), so a batch is exact whatever it holds (arXiv 1409.1556,
Sec. 3.2: the net is applied densely to each whole image). A net that cannot (a ViT: padding
would be tokens its attention reads) gets batches of one shape only (SAME_SHAPE). Planning only
decides speed: images are ordered by aspect ratio within the window (a row group, so memory
stays flat), a batch closes at `max_images` images or `max_pixels` padded pixels, whichever
comes first, or when mixing would waste more than MAX_MIXING_WASTE of it, and canvases are
rounded up to a GRID so only a few distinct batch shapes exist (what lets oneDNN's primitive
cache be reused).

On CUDA, cuDNN autotunes every new batch shape, and a shape includes the image count: batches
are bucketed instead (bucket_batches): each image goes to the smallest canvas of a coarse
ladder of aspects, a canvas's images fill batches of its full size, and a remainder is padded
with spare (empty) slots up to a power-of-two count. The shapes of a whole run are then a
bounded set (canvases x counts) instead of one per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from featx.errors import BadInput

# Canvas sides are multiples of GRID pixels. Measured on 320 Caltech-101 images (windows of
# 64, Q=256..512): grid 16 gives 19-36 distinct canvases per Q at 4-5% padding; grid 32 fewer
# shapes (15-24) but more padding (5-6%) and smaller batches; grid 8 more shapes for ~1% less.
GRID = 16
# A batch stays open to another image only while mixing sizes wastes at most this fraction
# of its canvas (beyond each image's own grid rounding): portrait and landscape images stay
# apart. 0.05: 5-7 images per batch at 4-5% padding on those images; 0.10: 7-12 at 7-10%.
MAX_MIXING_WASTE = 0.05
# (grid, max_waste) that batch identical shapes only: no rounding, no mixing.
SAME_SHAPE = (1, 0.0)
# Padded pixels per batch (before the flip doubles it) when --batch-pixels is 0 (auto).
# CPU: the trunk runs in passes of its own size anyway (featx.net.plan.plan.CPU_PASS_PIXELS);
# a larger batch feeds the head GEMMs more rows. CUDA: ~22 images at 512x512 per batch, with
# their flips one trunk pass (plan.CUDA_PASS_PIXELS): a few GB of activations in bf16.
BATCH_PIXELS = {"cpu": 4_000_000, "cuda": 5_767_168}
# CUDA buckets. Canvas sides are multiples of CUDA_GRID (VGG's stride: the padding is whole
# pool5 cells); the longer side is the shorter side's times the first of LADDER that holds the
# image. A remainder of n images is padded to the next power of two when that wastes at most
# MAX_SPARE of the batch's slots, else split (7 -> 8, 5 -> 4 + 1); spare slots then take images
# of smaller canvases. Counted on caltech101-mini's 320 photos in row groups of 64 at
# Q=256,384,512 with CUDA's caps (tests/extract/test_batching.py): 86 shapes in 150 batches at
# 11% padding (mixed planning: 132 shapes in 138 batches at 4.5%); ten times the photos, shuffled:
# 105 shapes at 11% (mixed: 676 shapes). MAX_SPARE 0.5: 62 shapes in 109 batches at 15%; 0.125:
# 97 in 178 at 9%; the ladder (1, 1.34, 1.5, 2, 2.5, 3): fewer shapes, 16-20% padding. Which of
# these (or no autotuning) is fastest is for benchmarks/gpu.py on a GPU to say.
CUDA_GRID = 32
LADDER = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
MAX_SPARE = 0.25


def default_batch_pixels(device_type: str) -> int:
    """The --batch-pixels that 0 (auto) means on a device of this type."""
    return BATCH_PIXELS.get(device_type, BATCH_PIXELS["cpu"])


def round_up(n: int, grid: int) -> int:
    return -(-n // grid) * grid


def padded_size(sizes: list[tuple[int, int]], grid: int = GRID) -> tuple[int, int]:
    """The canvas (H, W) a batch of images of these (h, w) is padded to."""
    return round_up(max(h for h, _ in sizes), grid), round_up(max(w for _, w in sizes), grid)


def plan_batches(
    sizes: list[tuple[int, int]],
    max_images: int,
    max_pixels: int,
    window: int | None = None,
    grid: int = GRID,
    max_waste: float = MAX_MIXING_WASTE,
) -> list[list[int]]:
    """Indices of `sizes` ((h, w) at one Q) grouped into batches, deterministically.

    Within each window of `window` consecutive images (default: all), images are ordered by
    aspect ratio; a batch closes when one more image would exceed `max_images`, `max_pixels`
    padded pixels, or `max_waste` of its canvas lost to mixing. An image larger than
    `max_pixels` on its own gets a batch of its own. Batches never span two windows.
    """
    if max_images < 1 or max_pixels < 1:
        raise ValueError(f"batch size {max_images} and batch pixels {max_pixels} must be positive")
    window = window or max(1, len(sizes))
    batches: list[list[int]] = []
    for start in range(0, len(sizes), window):
        order = sorted(
            range(start, min(start + window, len(sizes))), key=lambda i: (sizes[i][1] / sizes[i][0], sizes[i], i)
        )
        batch: list[int] = []
        for i in order:
            if batch and not _fits([*batch, i], sizes, max_images, max_pixels, grid, max_waste):
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    return batches


def _fits(batch: list[int], sizes, max_images: int, max_pixels: int, grid: int, max_waste: float) -> bool:
    if len(batch) > max_images:
        return False
    h, w = padded_size([sizes[i] for i in batch], grid)
    canvas = len(batch) * h * w
    own = sum(round_up(sizes[i][0], grid) * round_up(sizes[i][1], grid) for i in batch)
    return canvas <= max_pixels and canvas - own <= max_waste * canvas


@dataclass(frozen=True)
class Batch:
    """One forward pass: which images, the canvas they are padded into, and the image slots the
    device computes (the images, plus empty spare slots that round the count to a bucket)."""

    images: list[int]
    canvas: tuple[int, int]
    slots: int


def ladder_canvas(h: int, w: int, grid: int = CUDA_GRID, ladder: tuple[float, ...] = LADDER) -> tuple[int, int]:
    """The smallest canvas of the ladder that holds an h x w image (see LADDER)."""
    short, long = round_up(min(h, w), grid), max(h, w)
    side = next((s for s in (round_up(round(short * r), grid) for r in ladder) if s >= long), round_up(long, grid))
    return (short, side) if h <= w else (side, short)


def bucket_counts(n: int, cap: int, max_spare: float = MAX_SPARE) -> list[tuple[int, int]]:
    """[(images, slots)] for n images of one canvas: full batches of `cap`, then the remainder
    padded to a power of two (or `cap`) or split into such counts (see MAX_SPARE)."""
    counts = [(cap, cap)] * (n // cap)
    n %= cap
    while n:
        up = min(cap, 1 << (n - 1).bit_length())
        if (up - n) / up <= max_spare:
            counts.append((n, up))
            break
        down = 1 << (n.bit_length() - 1)
        counts.append((down, down))
        n -= down
    return counts


def bucket_batches(
    sizes: list[tuple[int, int]],
    max_images: int,
    max_pixels: int,
    grid: int = CUDA_GRID,
    ladder: tuple[float, ...] = LADDER,
    max_spare: float = MAX_SPARE,
) -> list[Batch]:
    """`sizes` ((h, w) at one Q) in batches of few distinct shapes, deterministically (CUDA's planning).

    Each image goes to its ladder canvas; from the largest canvas down, a canvas's images (in
    aspect order) fill batches of min(`max_images`, `max_pixels` / canvas) slots, the remainder
    padded or split by bucket_counts, and spare slots take images of smaller canvases that fit.
    Slots times canvas stays within `max_pixels` unless one image alone exceeds it.
    """
    if max_images < 1 or max_pixels < 1:
        raise BadInput(f"--batch-size {max_images} and --batch-pixels {max_pixels} must be positive")
    by_canvas: dict[tuple[int, int], list[int]] = {}
    for i in sorted(range(len(sizes)), key=lambda i: (sizes[i][1] / sizes[i][0], sizes[i], i)):
        by_canvas.setdefault(ladder_canvas(*sizes[i], grid, ladder), []).append(i)
    order = sorted(by_canvas, key=lambda c: (-c[0] * c[1], c))  # largest first
    batches: list[Batch] = []
    for k, canvas in enumerate(order):
        members = by_canvas[canvas]
        cap = max(1, min(max_images, max_pixels // (canvas[0] * canvas[1])))
        start = 0
        for n, slots in bucket_counts(len(members), cap, max_spare):
            batch = members[start : start + n]
            start += n
            # Spare slots take images of smaller canvases (that fit) before they run empty.
            for smaller in order[k + 1 :]:
                free = slots - len(batch)
                if free and smaller[0] <= canvas[0] and smaller[1] <= canvas[1] and by_canvas[smaller]:
                    batch += by_canvas[smaller][-free:]
                    del by_canvas[smaller][-free:]
            batches.append(Batch(batch, canvas, slots))
    return batches


@dataclass
class BatchStats:
    """How batches were formed: images per batch and the fraction of pixels that were padding."""

    batches: int = 0
    images: int = 0
    pixels: int = 0  # the images' own pixels
    padded_pixels: int = 0  # the canvases' pixels

    def add(self, sizes: list[tuple[int, int]], canvas: tuple[int, int], slots: int | None = None) -> None:
        """One batch of images of these sizes in `canvas`; `slots` (spare ones included) count as padding."""
        self.batches += 1
        self.images += len(sizes)
        self.pixels += sum(h * w for h, w in sizes)
        self.padded_pixels += max(len(sizes), slots or 0) * canvas[0] * canvas[1]

    def merge(self, other: BatchStats) -> None:
        self.batches += other.batches
        self.images += other.images
        self.pixels += other.pixels
        self.padded_pixels += other.padded_pixels

    @property
    def images_per_batch(self) -> float:
        return self.images / self.batches if self.batches else 0.0

    @property
    def padding(self) -> float:
        """Fraction of the computed canvas that was padding (spare slots included)."""
        return 1 - self.pixels / self.padded_pixels if self.padded_pixels else 0.0

    def summary(self) -> str:
        """E.g. '14.2 images per batch, 3% padding' (an image at each Q counts once)."""
        return f"{self.images_per_batch:.1f} images per batch, {100 * self.padding:.0f}% padding"
