"""Generators of awkward and bad image files, the kinds scraped folders are full of."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import smooth_image


def _rgb(seed: int, w: int = 160, h: int = 120) -> Image.Image:
    return smooth_image(np.random.default_rng(seed), w, h)


def good_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Files that must become rows, with their upright (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}

    def save(name, img, **kw):
        img.save(folder / name, **kw)
        sizes[name] = kw.pop("_size", None) or img.size

    save("gray.jpg", _rgb(1).convert("L"))
    save("cmyk.jpg", _rgb(2).convert("CMYK"))
    a16 = np.asarray(_rgb(3).convert("L"), dtype=np.uint16) * 257
    save("gray16.png", Image.fromarray(a16))
    pal = _rgb(4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    save("palette_transparent.png", pal, transparency=0)
    rgba = _rgb(5).convert("RGBA")
    rgba.putalpha(128)
    save("rgba.png", rgba)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    _rgb(6, 200, 120).save(folder / "exif_rotated.jpg", exif=exif.tobytes())
    sizes["exif_rotated.jpg"] = (120, 200)
    save("one_pixel.png", Image.new("RGB", (1, 1), (200, 30, 30)))
    save("elongated.jpg", _rgb(7, 1200, 40))
    save("naïve café 写真.jpg", _rgb(8))
    save("UPPER.JPG", _rgb(9))
    save("photo.webp", _rgb(10))
    save("bitmap.bmp", _rgb(11))
    frames = [_rgb(12), _rgb(13)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    sizes["animated.gif"] = frames[0].size
    buf = io.BytesIO()
    _rgb(14).save(buf, format="JPEG")
    (folder / "image_0001").write_bytes(buf.getvalue())  # extension-less, as in Caltech-101
    sizes["image_0001"] = (160, 120)
    return sizes


def bad_files(folder: Path) -> dict[str, str]:
    """Files that must become error records, with the stage expected."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not a PNG\n" * 20)
    (folder / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    # 20000 x 20000 one-bit PNG: a few KB on disk, 1.2 GB as RGB.
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")
    return {"empty.jpg": "decode", "text.png": "decode", "noise.jpg": "decode", "bomb.png": "decode"}


def truncated_jpeg(folder: Path) -> Path:
    buf = io.BytesIO()
    _rgb(20, 400, 300).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path = folder / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path
