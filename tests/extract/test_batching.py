"""Mixed-size batches are exact, and planning respects its caps: tiny nets, random weights, no timing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from featx.cli import app
from featx.extract.batching import (
    BATCH_PIXELS,
    CUDA_GRID,
    GRID,
    MAX_SPARE,
    Batch,
    BatchStats,
    bucket_batches,
    bucket_counts,
    ladder_canvas,
    padded_size,
    plan_batches,
)
from featx.extract.descriptor import combine, pooled_per_scale
from tests.caltech_sizes import CALTECH_MINI_SIZES
from tests.conftest import write_images
from tests.net.test_speed_paths import describer, images, tiny_net

# Odd and even sides, portrait and landscape; the tiny net has stride 4, so pool5 is
# floor(floor(h/2)/2) and fc6 (7x7) needs h, w >= 28.
SIZES = [(40, 52), (37, 45), (45, 31), (29, 41), (33, 33), (31, 60)]


def mixed_images(seed: int = 0) -> list[torch.Tensor]:
    return [images(1, h, w, seed=seed + i)[0] for i, (h, w) in enumerate(SIZES)]


def l2(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)


@pytest.mark.parametrize("layer", ["fc7", "fc6", "pool5"])
@pytest.mark.parametrize("flip", [True, False], ids=["flip", "no-flip"])
@pytest.mark.parametrize("prepack", [True, False], ids=["prepacked", "plain-kernels"])
def test_mixed_batch_equals_one_by_one(layer, flip, prepack):
    d = describer(tiny_net(layer), "fp32", prepack=prepack)
    d.flip = flip
    imgs = mixed_images()
    alone = torch.cat([d([x]) for x in imgs])
    for canvas in (None, (64, 96)):  # the tightest canvas, and one with wide margins
        mixed = d(imgs, canvas)
        assert (l2(mixed) - l2(alone)).abs().max() <= 1e-5, canvas
    # ... and the same images in another order and split give the same rows.
    order = [3, 0, 5, 1, 4, 2]
    split = torch.cat([d([imgs[i] for i in order[:2]]), d([imgs[i] for i in order[2:]])])
    assert (l2(split) - l2(alone[order])).abs().max() <= 1e-5


@pytest.mark.parametrize("layer", ["fc7", "pool5"])
def test_plain_unmasked_padding_would_fail(layer):
    """Without re-zeroing the padding after each layer, border positions see the pad's
    conv outputs: the check above would catch it."""
    d = describer(tiny_net(layer), "fp32", prepack=False)
    imgs = mixed_images()
    alone = torch.cat([d([x]) for x in imgs])
    leaky = d.run(d.stage(imgs, (64, 96)), rezero=False)
    errors = (l2(leaky) - l2(alone)).abs().amax(dim=1)
    assert errors.max() > 1e-3
    # The largest-canvas image (no padding) is the same either way.
    masked = d.run(d.stage(imgs, (64, 96)))
    assert (l2(masked) - l2(alone)).abs().max() <= 1e-5


@pytest.mark.parametrize("layer", ["fc7", "fc6", "pool5"])
@pytest.mark.parametrize("bn", [False, True], ids=["conv", "conv-bn"])
def test_the_reference_forward_batches_exactly_and_the_plan_is_its_lowering(layer, bn):
    """The net's own forward_pooled (forward_features, then forward_head over the valid positions)
    keeps each image of a mixed batch as it is alone; the Plan gives its numbers on either path."""
    net = tiny_net(layer, bn)
    reference = describer(net, "fp32", lower=False)
    assert not reference.prepacked
    imgs = mixed_images(seed=11)
    alone = torch.cat([reference([x]) for x in imgs])
    mixed = reference(imgs, (64, 96))
    assert (l2(mixed) - l2(alone)).abs().max() <= 1e-5
    for prepack in (True, False):
        lowered = describer(net, "fp32", prepack=prepack)(imgs, (64, 96))
        assert (l2(lowered) - l2(mixed)).abs().max() <= 1e-5, prepack
    # ... and the check can fail: without re-zeroing the padding the border positions leak.
    leaky = reference.run(reference.stage(imgs, (64, 96)), rezero=False)
    assert (l2(leaky) - l2(alone)).abs().max() > 1e-3


def test_mixed_batch_in_bf16_is_within_rounding():
    d = describer(tiny_net(), "bf16")
    imgs = mixed_images(seed=7)
    alone, mixed = torch.cat([d([x]) for x in imgs]), d(imgs)
    cos = F.cosine_similarity(mixed, alone, dim=1)
    assert cos.min() > 0.999, cos


@pytest.mark.parametrize("aggregate", ["mean", "stack"])
def test_pooled_per_scale_mixed_equals_one_at_a_time(aggregate):
    d = describer(tiny_net(), "fp32", prepack=False)
    rng = np.random.default_rng(0)
    scaled = []
    for i in range(7):
        h, w = int(rng.integers(28, 60)), int(rng.integers(28, 60))
        scaled.append({32: images(1, h, w, seed=i)[0], 40: images(1, h + 9, w + 7, seed=i)[0]})
    stats = BatchStats()
    mixed = combine(pooled_per_scale(d, scaled, (32, 40), batch_size=8, stats=stats), aggregate)
    alone = combine(pooled_per_scale(d, scaled, (32, 40), batch_size=1), aggregate)
    assert (mixed - alone).abs().max() <= 1e-5
    assert stats.images == 14 and stats.batches < 14 and 0 < stats.padding < 1


def test_a_failing_image_costs_only_its_own_row():
    d = describer(tiny_net(), "fp32", prepack=False)
    scaled = [{32: x} for x in mixed_images()]
    scaled[2] = {32: images(1, 20, 40)[0]}  # too small for fc6's 7x7 window
    failed: dict = {}
    out = pooled_per_scale(d, scaled, (32,), batch_size=8, failed=failed)[0]
    assert list(failed) == [2]
    alone = torch.cat([d([s[32]]) for i, s in enumerate(scaled) if i != 2])
    keep = [i for i in range(len(scaled)) if i != 2]
    assert (out[keep] - alone).abs().max() <= 1e-5 and not out[2].any()


# -- planning -------------------------------------------------------------------------------
def caltech_like_sizes(n: int, q: int = 256, seed: int = 0) -> list[tuple[int, int]]:
    """Smaller side Q, aspect 0.6-1.7 (portrait and landscape), as Caltech-101 at Q=256."""
    rng = np.random.default_rng(seed)
    sizes = []
    for _ in range(n):
        a = float(rng.uniform(0.6, 1.7))
        sizes.append((q, round(q * a)) if a >= 1 else (round(q / a), q))
    return sizes


def test_planning_respects_the_caps_and_covers_every_image_once():
    sizes = caltech_like_sizes(200)
    batches = plan_batches(sizes, max_images=16, max_pixels=1_000_000)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        h, w = padded_size([sizes[i] for i in b])
        assert len(b) <= 16 and (len(b) * h * w <= 1_000_000 or len(b) == 1)
        assert h % GRID == 0 and w % GRID == 0
    # The pixel cap, not the image cap, closed the batches here (~100 k pixels an image).
    assert max(map(len, batches)) < 16
    # An image above the pixel cap still gets a batch of its own.
    assert plan_batches([(512, 2000), (256, 300)], max_images=8, max_pixels=100_000) == [[1], [0]]


def test_planning_never_crosses_the_window():
    sizes = caltech_like_sizes(100, seed=1)
    for b in plan_batches(sizes, max_images=32, max_pixels=10**9, window=25):
        assert len({i // 25 for i in b}) == 1


def test_planning_keeps_padding_small_and_shapes_few():
    sizes = caltech_like_sizes(320, seed=2)
    stats = BatchStats()
    batches = plan_batches(sizes, max_images=32, max_pixels=32 * 256 * 448, window=64)
    for b in batches:
        stats.add([sizes[i] for i in b], padded_size([sizes[i] for i in b]))
    assert stats.images_per_batch > 5 and stats.padding < 0.07, stats
    assert len({padded_size([sizes[i] for i in b]) for b in batches}) < len(set(sizes)) / 4
    # Random order in batches of 32 (no aspect sorting) wastes far more: the plan is what helps.
    rng = np.random.default_rng(0)
    order = rng.permutation(320)
    naive = BatchStats()
    for s in range(0, 320, 32):
        chunk = [sizes[i] for i in order[s : s + 32]]
        naive.add(chunk, padded_size(chunk))
    assert naive.padding > 3 * stats.padding
    assert stats.summary().endswith("% padding") and " images per batch, " in stats.summary()


def test_extract_says_images_per_batch_and_padding(tmp_path):
    # Five 4:3-ish landscapes, 32 x 42-43 at Q=32: one canvas size, so batches of 4 + 1.
    write_images(tmp_path / "in", [(64, 48), (60, 45), (66, 50), (70, 52), (64, 48)])
    out = tmp_path / "f.parquet"
    result = CliRunner().invoke(
        app,
        [
            "extract",
            str(tmp_path / "in"),
            "-o",
            str(out),
            "--model",
            "vgg11",
            "--weights",
            "random",
            "--layer",
            "pool5",
            "--scales",
            "32",
            "--batch-size",
            "4",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert "; 2.5 images per batch, " in line and line.endswith("% padding"), line


# -- several devices: each its own stream of batches, one output ---------------------------
def test_two_devices_share_the_batches_into_one_output():
    net = tiny_net()
    one, two = describer(net, "fp32"), [describer(net, "fp32"), describer(net, "fp32", prepack=False)]
    scaled = [{32: x, 40: images(1, x.shape[1] + 8, x.shape[2] + 8, seed=i)[0]} for i, x in enumerate(mixed_images())]
    stats = BatchStats()
    ref = pooled_per_scale(one, scaled, (32, 40), batch_size=2)
    got = pooled_per_scale(two, scaled, (32, 40), batch_size=2, stats=stats)
    for a, b in zip(ref, got):
        assert (a - b).abs().max() <= 1e-5 and a.abs().max() > 0
    assert stats.images == 12


def test_extract_on_two_devices_equals_one(tmp_path):
    import featx

    write_images(tmp_path / "in", [(64, 48), (50, 70), (66, 50), (80, 52)])
    settings = dict(model="vgg11", weights="random", layer="pool5", scales=(32, 48), precision="fp32", device="cpu")
    featx.extract_features(tmp_path / "in", tmp_path / "a.parquet", **settings)
    result = featx.extract_features(
        tmp_path / "in", tmp_path / "b.parquet", devices="cpu,cpu", batch_size=2, **settings
    )
    a, b = featx.read_features(tmp_path / "a.parquet"), featx.read_features(tmp_path / "b.parquet")
    assert a["path"].tolist() == b["path"].tolist() and result.rows == 4
    assert np.abs(np.stack(a["feature"]) - np.stack(b["feature"])).max() <= 1e-5
    assert featx.read_provenance(tmp_path / "b.parquet")["device"] == "cpu,cpu"


def test_devices_are_checked():
    from featx.net.device import resolve_devices

    assert [d.type for d in resolve_devices("cpu, cpu")] == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="names no device"):
        resolve_devices(" , ")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_devices("all")


# -- CUDA's buckets: few batch shapes, so cuDNN autotunes each only once -----------------------
def caltech_shapes(sizes: list[tuple[int, int]], bucketed: bool) -> tuple[set, int, BatchStats]:
    """(batch shapes, batches, stats) of planning `sizes` ((w, h) photos) as a CUDA run does:
    row groups of 64, Q=256,384,512, CUDA's caps (batch size 32, default batch pixels)."""
    from featx.extract.decode import scaled_size

    shapes, batches, stats = set(), 0, BatchStats()
    for start in range(0, len(sizes), 64):
        for q in (256, 384, 512):
            at_q = [scaled_size(w, h, q) for w, h in sizes[start : start + 64]]
            if bucketed:
                planned = [(b.images, b.canvas, b.slots) for b in bucket_batches(at_q, 32, BATCH_PIXELS["cuda"])]
            else:
                planned = [
                    (b, padded_size([at_q[i] for i in b]), len(b)) for b in plan_batches(at_q, 32, BATCH_PIXELS["cuda"])
                ]
            for members, canvas, slots in planned:
                shapes.add((slots, *canvas))
                stats.add([at_q[i] for i in members], canvas, slots)
                batches += 1
    return shapes, batches, stats


def test_buckets_give_few_shapes_on_caltech_sizes():
    # caltech101-mini's 320 photos: mixed planning makes almost every batch a new shape.
    mixed, mixed_batches, _ = caltech_shapes(CALTECH_MINI_SIZES, bucketed=False)
    assert len(mixed) == 132 and mixed_batches == 138
    shapes, batches, stats = caltech_shapes(CALTECH_MINI_SIZES, bucketed=True)
    assert len(shapes) <= 90 and batches <= 160 and stats.padding < 0.12, (len(shapes), batches, stats)
    # ... and they are a bounded set: ten times the photos (shuffled) add few shapes, while
    # mixed planning keeps making new ones.
    more = [CALTECH_MINI_SIZES[i] for i in np.random.default_rng(0).permutation(3200) % 320]
    more_mixed, _, _ = caltech_shapes(more, bucketed=False)
    more_shapes, _, more_stats = caltech_shapes(more, bucketed=True)
    assert len(more_shapes) <= 110 < 500 < len(more_mixed), (len(more_shapes), len(more_mixed))
    assert more_stats.padding < 0.12


def test_bucketed_batches_cover_every_image_once_within_the_caps():
    from featx.extract.decode import scaled_size

    sizes = [scaled_size(w, h, 384) for w, h in CALTECH_MINI_SIZES[:200]]
    batches = bucket_batches(sizes, max_images=16, max_pixels=3_000_000)
    assert sorted(i for b in batches for i in b.images) == list(range(200))
    for b in batches:
        h, w = b.canvas
        assert h % CUDA_GRID == 0 and w % CUDA_GRID == 0
        assert all(sizes[i][0] <= h and sizes[i][1] <= w for i in b.images)
        assert len(b.images) <= b.slots <= 16 and b.slots * h * w <= 3_000_000
        # a count is a full batch, a power of two, or the cap; spare slots at most MAX_SPARE of it
        cap = min(16, 3_000_000 // (h * w))
        assert b.slots == cap or b.slots & (b.slots - 1) == 0, b
        assert (b.slots - len(b.images)) / b.slots <= MAX_SPARE
    # an image above the pixel cap alone gets a batch of one slot
    assert bucket_batches([(256, 3000)], 8, 100_000) == [Batch([0], (256, 3008), 1)]


def test_bucket_counts_pad_or_split_the_remainder():
    assert bucket_counts(7, 32) == [(7, 8)]  # one spare slot of eight
    assert bucket_counts(5, 32) == [(4, 4), (1, 1)]  # three spare of eight would waste too much
    assert bucket_counts(40, 16) == [(16, 16), (16, 16), (8, 8)]
    assert bucket_counts(11, 12) == [(11, 12)]  # the cap is a count too
    assert bucket_counts(0, 4) == []


def test_ladder_canvases_keep_orientation():
    assert ladder_canvas(256, 341) == (256, 384)  # 341 > 1.25 x 256 = 320: the 1.5 rung
    assert ladder_canvas(341, 256) == (384, 256)
    assert ladder_canvas(250, 300) == (256, 320)  # sides on the grid of 32
    assert ladder_canvas(224, 224) == (224, 224)
    assert ladder_canvas(256, 2600) == (256, 2624)  # beyond the ladder (10:1): the grid


def test_spare_slots_count_as_padding():
    stats = BatchStats()
    stats.add([(10, 10)] * 3, (10, 10), slots=4)
    assert stats.images == 3 and stats.padding == pytest.approx(0.25)


@pytest.mark.parametrize("batched", [False, True], ids=["per-image", "batched"])
def test_a_bucketed_batch_with_spare_slots_is_exact(batched):
    d = describer(tiny_net(), "fp32", prepack=False)
    d.batched = batched
    imgs = mixed_images(seed=5)
    alone = torch.cat([d([x]) for x in imgs])
    padded = d.run(d.stage(imgs, (64, 64), slots=8))
    assert padded.shape == alone.shape
    assert (l2(padded) - l2(alone)).abs().max() <= 1e-5
    # ... through the driver too, with CUDA's planning forced on the CPU
    scaled = [{32: x} for x in imgs]
    stats = BatchStats()
    bucketed = pooled_per_scale(d, scaled, (32,), batch_size=4, buckets=True, stats=stats)[0]
    assert (l2(bucketed) - l2(alone)).abs().max() <= 1e-5 and stats.images == len(imgs)
