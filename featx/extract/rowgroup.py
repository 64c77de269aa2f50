"""One row group, image by image: the stages the local and the Ray engine share.

decode_item      file -> upright RGB rescaled to every Q (or an ImageError record)
decode_items     the items of one file (its regions) -> one decode, each crop rescaled
describe_group   decoded images -> L2-normalised descriptors, failures isolated per image
group_rows       the described images -> an Arrow table in the feature file's schema
error_record     a failed image (or region) -> one row of the errors table
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from featx import store
from featx.extract.batching import BatchStats
from featx.extract.config import ExtractConfig
from featx.extract.decode import Decoded, ImageError, decode, decode_regions
from featx.extract.describer import DenseDescriber
from featx.extract.descriptor import combine, pooled_per_scale
from featx.extract.discover import Item


def decode_item(item: Item, config: ExtractConfig) -> Decoded | ImageError:
    """Decode and rescale one image; any failure is returned as that image's ImageError."""
    try:
        return decode(item.file, config.scales, config.max_pixels, config.bucket)
    except ImageError as e:
        return e
    except Exception as e:  # a decoder bug on one file must not end the run
        return ImageError("decode", type(e).__name__, str(e))


def decode_items(items: list[Item], config: ExtractConfig) -> list[Decoded | ImageError]:
    """Decode the items of one file: a whole image, or all its regions from one decode."""
    if len(items) == 1 and items[0].box is None:
        return [decode_item(items[0], config)]
    try:
        return decode_regions(items[0].file, [it.box for it in items], config.scales, config.max_pixels, config.bucket)
    except ImageError as e:
        return [e] * len(items)
    except Exception as e:  # a decoder bug on one file must not end the run
        return [ImageError("decode", type(e).__name__, str(e))] * len(items)


def error_record(item: Item, e: ImageError) -> dict:
    """One row of the errors table (with the region's id for a region)."""
    record = {"path": item.path, "stage": e.stage, "error": e.error, "message": e.message}
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
