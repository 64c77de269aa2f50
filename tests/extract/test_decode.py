"""Decoding: every image upright as 8-bit RGB; bad files become ImageError, never a crash."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featx.extract.decode import (
    ImageError,
    crop_aspect,
    decode,
    open_upright,
    scaled_size,
    to_rgb,
)
from tests.awkward import bad_files, good_files, truncated_jpeg

MAX = 89_478_485


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    return folder, good_files(folder)


def test_every_awkward_file_decodes_upright_as_rgb(good):
    folder, sizes = good
    for name, size in sizes.items():
        img = open_upright(folder / name, MAX)
        assert img.mode == "RGB", name
        assert img.size == size, name


def test_16_bit_png_is_scaled_not_clipped():
    a16 = np.full((4, 4), 30000, dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(a16)))
    assert rgb.shape == (4, 4, 3) and (rgb == round(30000 / 257)).all()


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert (np.asarray(to_rgb(rgba)) == 255).all()
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert abs(int(np.asarray(to_rgb(half))[0, 0, 0]) - 127) <= 1


def test_exif_rotation_turns_pixels_not_only_the_size(good):
    folder, _ = good
    raw = Image.open(folder / "exif_rotated.jpg").convert("RGB")
    upright = np.asarray(open_upright(folder / "exif_rotated.jpg", MAX), dtype=np.int32)
    expected = np.asarray(raw.transpose(Image.Transpose.ROTATE_270), dtype=np.int32)
    assert np.abs(upright - expected).max() <= 1


def test_animated_gif_gives_its_first_frame(good):
    folder, _ = good
    first = Image.open(folder / "animated.gif")
    expected = np.asarray(first.convert("RGB"))
    assert np.array_equal(np.asarray(open_upright(folder / "animated.gif", MAX)), expected)


def test_bad_files_raise_image_error(tmp_path):
    for name, stage in bad_files(tmp_path).items():
        with pytest.raises(ImageError) as e:
            decode(tmp_path / name, (224,), MAX)
        assert e.value.stage == stage, name
        assert e.value.message


def test_too_many_pixels_is_refused_from_the_header_without_decoding(tmp_path, monkeypatch):
    bad_files(tmp_path)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an oversized image"))
    with pytest.raises(ImageError, match="over --max-pixels 89478485; raise --max-pixels"):
        open_upright(tmp_path / "bomb.png", MAX)


def test_vanished_file_is_a_read_error(tmp_path):
    with pytest.raises(ImageError) as e:
        decode(tmp_path / "gone.jpg", (224,), MAX)
    assert e.value.stage == "read"


def test_truncated_jpeg_is_decoded_or_refused_never_crashes(tmp_path):
    path = truncated_jpeg(tmp_path)
    try:
        d = decode(path, (224,), MAX)
    except ImageError as e:
        assert e.stage == "decode"
    else:
        assert d.scaled[224].shape[-2] == 224


@pytest.mark.parametrize(
    "w,h,q,expected",
    [(400, 300, 256, (256, 341)), (300, 400, 256, (341, 256)), (1, 1, 224, (224, 224)), (100, 100, 384, (384, 384))],
)
def test_smaller_side_is_q_as_torchvision_resize(w, h, q, expected):
    assert scaled_size(w, h, q) == expected


def test_extreme_aspect_is_centre_cropped_to_ten_to_one():
    import torch

    img = torch.arange(40 * 1000).view(1, 40, 1000).expand(3, -1, -1)
    cropped = crop_aspect(img)
    assert cropped.shape == (3, 40, 400)
    assert torch.equal(cropped[0, 0, 0], img[0, 0, 300])
    assert crop_aspect(img[..., :400]).shape == (3, 40, 400)


def test_importing_and_decoding_leave_pillows_global_settings_alone(tmp_path):
    """featx is a library: its host's Pillow limits stay as the host set them (issue 13.5)."""
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "a.jpg")
    code = (
        "import json, sys; from PIL import Image, ImageFile;"
        "before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES);"
        "import featx, featx.extract.decode as d, featx.extract.run;"
        "after_import = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES);"
        f"d.decode({str(tmp_path / 'a.jpg')!r}, (224,), 10**9);"
        "after_decode = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES);"
        "print(json.dumps([before, after_import, after_decode]))"
    )
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    before, after_import, after_decode = json.loads(proc.stdout)
    assert before == [89_478_485, False]
    assert after_import == before and after_decode == before


def test_limits_are_per_call_whatever_the_host_set(tmp_path, monkeypatch):
    """A host's looser or stricter Pillow globals change neither --max-pixels nor truncation."""
    from PIL import ImageFile

    bad_files(tmp_path)
    path = truncated_jpeg(tmp_path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageError, match="truncated") as e:
        decode(path, (224,), MAX)
    assert e.value.stage == "decode"
    with pytest.raises(ImageError, match="over --max-pixels 89478485"):
        open_upright(tmp_path / "bomb.png", MAX)
    # A host stricter than the call: --max-pixels decides, and Pillow does not warn.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (160, 120)).save(tmp_path / "ok.png")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_upright(tmp_path / "ok.png", MAX).size == (160, 120)
    with pytest.raises(ImageError, match="over --max-pixels 1000"):
        open_upright(tmp_path / "ok.png", 1000)


@pytest.mark.parametrize("cpu", ["native", "DEFAULT"])
def test_resize_is_torchvisions_pixel_for_pixel(cpu, monkeypatch):
    """featx resizes without importing torchvision: the same pixels as torchvision's
    resize(antialias=True) on 300 random sizes, up and down, contiguous and channels-last; with a
    CPU torch has no vectorised uint8 kernel for ("DEFAULT"), both go through float32."""
    import torchvision.transforms.v2.functional as TF

    from featx.extract.decode import resize

    if cpu == "DEFAULT":
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
        monkeypatch.setattr("platform.machine", lambda: "x86_64")
    g = torch.Generator().manual_seed(0)
    for i in range(300):
        H, W, h, w = torch.randint(1, 200, (4,), generator=g).tolist()
        image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
        if i % 3 == 0:
            image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # channels-last, as a decoder may give
        expected = TF.resize(image, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        assert torch.equal(resize(image, h, w), expected), (H, W, h, w)
