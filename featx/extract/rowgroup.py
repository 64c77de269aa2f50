"""One row group, image by image: the stages the local and the Ray engine share.

decode_item      file -> upright RGB rescaled to every Q (or an ImageError record)
decode_items     the items of one file (its regions) -> one decode, each crop rescaled
work_units       the items in units of a few boxes for the decode threads
OpenedOnce       one image whose regions are cut in several units, decoded once
describe_group   decoded images -> L2-normalised descriptors, failures isolated per image
group_rows       the described images -> an Arrow table in the feature file's schema
error_record     a failed image (or region) -> one row of the errors table
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from PIL import Image

from featx import store
from featx.extract.batching import BatchStats
from featx.extract.config import ExtractConfig
from featx.extract.decode import Decoded, ImageError, Stopped, crop_regions, decode, open_upright
from featx.extract.describer import DenseDescriber
from featx.extract.descriptor import combine, pooled_per_scale
from featx.extract.discover import Item, as_text


def decode_item(item: Item, config: ExtractConfig, stop: threading.Event | None = None) -> Decoded | ImageError:
    """Decode and rescale one image; any failure is returned as that image's ImageError.

    Stopped (the run ends: `stop` is set) is raised, never recorded as the image's failure.
    """
    if item.failure is not None:
        return ImageError(*item.failure)
    try:
        return decode(item.file, config.scales, config.max_pixels, config.bucket, stop)
    except ImageError as e:
        return e
    except Stopped:
        raise
    except Exception as e:  # a decoder bug on one file must not end the run
        return ImageError("decode", type(e).__name__, str(e))


class OpenedOnce:
    """One image shared by the units its regions are cut in: opened once, let go after the last.

    Each of `units` calls `take()` once; the first opens the image (or meets its failure).
    """

    def __init__(self, file, max_pixels: int, units: int, stop: threading.Event | None = None):
        self.file, self.max_pixels, self.stop = file, max_pixels, stop
        self._left, self._lock = units, threading.Lock()
        self._image: Image.Image | ImageError | None = None

    def take(self) -> Image.Image:
        with self._lock:
            if self._image is None:
                try:
                    self._image = open_upright(self.file, self.max_pixels, self.stop)
                except ImageError as e:
                    self._image = e
            image = self._image
            self._left -= 1
            if self._left <= 0:
                self._image = None  # the last unit: the image's memory goes with it
        if isinstance(image, ImageError):
            raise image
        return image


def decode_items(
    items: list[Item], config: ExtractConfig, stop: threading.Event | None = None, image: OpenedOnce | None = None
) -> list[Decoded | ImageError]:
    """Decode the items of one file: a whole image, or regions from one decode (`image`: shared
    with the file's other units of regions)."""
    if len(items) == 1 and items[0].box is None:
        return [decode_item(items[0], config, stop)]
    if items[0].failure is not None:
        return [ImageError(*items[0].failure)] * len(items)
    try:
        img = (image or OpenedOnce(items[0].file, config.max_pixels, 1, stop)).take()
        return crop_regions(img, [it.box for it in items], config.scales, config.bucket)
    except ImageError as e:
        return [e] * len(items)
    except Stopped:
        raise
    except Exception as e:  # a decoder bug on one file must not end the run
        return [ImageError("decode", type(e).__name__, str(e))] * len(items)


def work_units(
    items: list[Item], size: int, config: ExtractConfig, stop: threading.Event | None = None
) -> list[tuple[list[Item], OpenedOnce | None]]:
    """The items in units of at most `size` boxes for the decode threads, in order: a whole
    image alone, an image's regions in units that share one decode of the image."""
    units: list[tuple[list[Item], OpenedOnce | None]] = []
    for group in by_image(items):
        if group[0].box is None:
            units.append((group, None))
            continue
        chunks = [group[i : i + size] for i in range(0, len(group), size)]
        image = OpenedOnce(group[0].file, config.max_pixels, len(chunks), stop) if len(chunks) > 1 else None
        units += [(chunk, image) for chunk in chunks]
    return units


def by_image(items: list[Item]) -> list[list[Item]]:
    """The items in groups that one decode serves, in order: a whole image alone, the regions of
    one recorded image together (two paths of one file, a link and its target, stay apart)."""
    key = itertools.count()
    return [
        list(group)
        for _, group in itertools.groupby(items, key=lambda it: next(key) if it.box is None else (it.path, it.file))
    ]


def error_record(item: Item, e: ImageError) -> dict:
    """One row of the errors table (with the region's id for a region)."""
    record = {"path": item.path, "stage": e.stage, "error": e.error, "message": as_text(e.message)}
    return record if item.region is None else record | {"region": item.region}


def describe_group(
    describer: DenseDescriber | list[DenseDescriber],
    decoded: list[Decoded],
    config: ExtractConfig,
    on_batch: Callable[[int, float], None] | None = None,
    stats: BatchStats | None = None,
) -> tuple[np.ndarray, dict[int, ImageError]]:
    """Descriptors [n, D] of a group of decoded images, and the images that failed in the net.

    The group is the batch planner's window: its images, mixed sizes, share exact batches
    (featx.extract.batching). A failing batch is retried image by image, so one image's
    failure never costs its batch-mates their rows. `on_batch(images, seconds)` is called
    after every batch; `stats` gathers images per batch and padding. Several describers (one
    per device) share the group's batches.
    """
    errors: dict[int, Exception] = {}
    per_scale = pooled_per_scale(
        describer,
        [d.scaled for d in decoded],
        config.scales,
        config.batch_size,
        batch_pixels=config.batch_pixels,
        on_batch=on_batch,
        failed=errors,
        stats=stats,
    )
    failed = {
        i: ImageError("model", type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
        for i, e in errors.items()
    }
    return combine(per_scale, config.aggregate).numpy(), failed


def group_rows(
    schema: pa.Schema, group: list[tuple[Item, Decoded]], features: np.ndarray, failed: dict[int, ImageError]
) -> pa.Table:
    """The rows of the images of `group` that did not fail, in the feature file's schema."""
    keep = [i for i in range(len(group)) if i not in failed]
    items = [group[i][0] for i in keep]
    return store.rows_table(
        schema,
        [it.path for it in items],
        [it.label for it in items],
        [group[i][1].width for i in keep],
        [group[i][1].height for i in keep],
        features[keep],
        regions=[it.region for it in items],
        boxes=[it.box for it in items],
    )
