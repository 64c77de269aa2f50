"""Decode an image upright as 8-bit RGB and rescale it so its smaller side is Q.

Paper, Appendix B: "the image is isotropically rescaled to the smallest side Q". The resize
is torchvision's (bilinear, antialiased) on the uint8 tensor, as `transforms.v2.Resize(Q)`.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps

# Beyond this aspect ratio the longer side is centre-cropped before rescaling: a 100:1 banner
# at Q=768 would otherwise need tens of GiB of activations for a single image.
MAX_ASPECT = 10

RESIZE = {
    "op": "torchvision.transforms.v2.functional.resize",
    "input": "uint8 RGB, EXIF-upright, alpha composited over white",
    "smaller_side": "Q",
    "interpolation": "bilinear",
    "antialias": True,
    "max_aspect": MAX_ASPECT,
    "beyond_max_aspect": "centre crop of the longer side",
}


class ImageError(Exception):
    """One image could not become a row; `stage` says where it failed."""

    def __init__(self, stage: str, error: str, message: str):
        super().__init__(message)
        self.stage, self.error, self.message = stage, error, message


@dataclass
class Decoded:
    width: int  # upright, after EXIF orientation
    height: int
    scaled: dict[int, torch.Tensor]  # Q -> uint8 [3, h, w], smaller side Q


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB for any mode: 16-bit is scaled (not clipped), alpha is composited over white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        # 16-bit data: full range is 0..65535 (mode "I" from a 16-bit PNG holds the same).
        peak = 65535.0 if (img.mode.startswith("I;16") or a.max(initial=0) > 255) else 255.0
        a = np.clip(np.rint(a * (255.0 / peak)), 0, 255).astype(np.uint8)
        img = Image.fromarray(a)
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        peak = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(np.rint(a * 255.0 / peak), 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def upright_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied, then 8-bit RGB: how every image enters featx."""
    return to_rgb(ImageOps.exif_transpose(img))


class _WatchedFile(io.BufferedReader):
    """A file that notes when a read finds nothing left: Pillow asking for more than the file holds."""

    ran_out = False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if not data and size != 0:
            self.ran_out = True
        return data


def _identify(fp: _WatchedFile) -> Image.Image:
    """Image.open's format search without its process-wide bomb check (featx checks per call).

    Pillow refuses or warns about large images by its global `Image.MAX_IMAGE_PIXELS`; featx
    must neither change that global nor let it override `--max-pixels`, so it asks Pillow's
    registered openers (`Image.OPEN`, the table `Image.register_open` fills) directly.
    """
    prefix = fp.read(16)
    tried: set[str] = set()
    for load_plugins in (Image.preinit, Image.init):
        load_plugins()
        for fmt in [f for f in Image.ID if f not in tried]:
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            if accept is not None and accept(prefix) is not True:
                continue
            fp.seek(0)
            try:
                return factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise Image.UnidentifiedImageError("cannot identify image file")


def open_upright(file: str | os.PathLike, max_pixels: int) -> Image.Image:
    """Open, refuse oversized images from the header alone, decode the first frame upright.

    Both limits belong to the call, not to Pillow's globals: `max_pixels` is checked from the
    header, and a truncated file is refused (never decoded half-grey) whatever the host
    application set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` to.
    """
    try:
        fp = _WatchedFile(io.FileIO(file, "rb"))
    except FileNotFoundError:
        raise ImageError("read", "FileNotFoundError", "the file vanished before it was read") from None
    except PermissionError as e:
        raise ImageError("read", "PermissionError", f"cannot read the file: {e.strerror}") from None
    except IsADirectoryError:
        raise ImageError("read", "IsADirectoryError", "a folder, not an image file") from None
    with fp:
        try:
            img = _identify(fp)
        except Exception as e:
            raise ImageError("decode", type(e).__name__, f"not an image Pillow can open: {e}") from None
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    "decode",
                    "TooManyPixels",
                    f"{w}x{h} = {w * h} pixels is over --max-pixels {max_pixels}; raise --max-pixels to include it",
                )
            try:
                img.seek(0)  # animated GIF / WebP: the first frame
                fp.ran_out = False
                img.load()
            except Exception as e:
                raise ImageError("decode", type(e).__name__, f"cannot decode: {e}") from None
            if fp.ran_out:
                # Pillow fills the missing part with grey when the host allows truncated images.
                raise ImageError("decode", "Truncated", "image file is truncated; the file is incomplete")
            try:
                return upright_rgb(img)
            except Exception as e:
                raise ImageError("decode", type(e).__name__, f"cannot decode: {e}") from None


def scaled_size(width: int, height: int, q: int, bucket: int = 0) -> tuple[int, int]:
    """(h, w) with the smaller side Q, as torchvision's Resize(Q); `bucket` snaps the longer side."""
    if width <= height:
        long = int(q * height / width)
        if bucket:
            long = max(q, round(long / bucket) * bucket)
        return long, q
    long = int(q * width / height)
    if bucket:
        long = max(q, round(long / bucket) * bucket)
    return q, long


def crop_aspect(image: torch.Tensor, max_aspect: int = MAX_ASPECT) -> torch.Tensor:
    """Centre-crop the longer side of a [3, H, W] image to at most `max_aspect` x the shorter."""
    h, w = image.shape[-2:]
    if w > max_aspect * h:
        x0 = (w - max_aspect * h) // 2
        return image[..., :, x0 : x0 + max_aspect * h]
    if h > max_aspect * w:
        y0 = (h - max_aspect * w) // 2
        return image[..., y0 : y0 + max_aspect * w, :]
    return image


def rescale(image: torch.Tensor, q: int, bucket: int = 0) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w] with min(h, w) == Q (bilinear, antialiased)."""
    image = crop_aspect(image)
    h, w = scaled_size(image.shape[-1], image.shape[-2], q, bucket)
    return TF.resize(image, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def decode(file, scales: tuple[int, ...], max_pixels: int, bucket: int = 0) -> Decoded:
    """Read one image and rescale it to every Q in `scales`; raises ImageError."""
    return decode_image(open_upright(file, max_pixels), scales, bucket)


def decode_image(img: Image.Image, scales: tuple[int, ...], bucket: int = 0) -> Decoded:
    """An upright RGB image rescaled to every Q in `scales`."""
    tensor = pil_to_tensor(img)
    return Decoded(img.width, img.height, {q: rescale(tensor, q, bucket) for q in scales})


def crop_box(img: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The pixels x1 <= x < x2, y1 <= y < y2 of an upright RGB image (PIL's crop convention).

    A box that is empty or reaches outside the image raises ImageError (stage "region").
    """
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise ImageError("region", "EmptyBox", f"box {list(box)} is empty: x2 must exceed x1 and y2 exceed y1")
    if x1 < 0 or y1 < 0 or x2 > img.width or y2 > img.height:
        raise ImageError(
            "region",
            "BoxOutsideImage",
            f"box {list(box)} reaches outside the upright {img.width}x{img.height} image "
            f"(0 <= x1 < x2 <= {img.width}, 0 <= y1 < y2 <= {img.height})",
        )
    return img.crop(box)


def decode_regions(
    file, boxes: list[tuple[int, int, int, int]], scales: tuple[int, ...], max_pixels: int, bucket: int = 0
) -> list[Decoded | ImageError]:
    """Read one image once and rescale each box's crop to every Q, as a whole image would be.

    The crop is taken from the upright 8-bit RGB image before rescaling, so the crop's smaller
    side becomes Q. Width and height are the whole image's. A failure to read the image raises
    ImageError; a bad box is returned as that box's ImageError.
    """
    img = open_upright(file, max_pixels)
    out: list[Decoded | ImageError] = []
    for box in boxes:
        try:
            d = decode_image(crop_box(img, box), scales, bucket)
        except ImageError as e:
            out.append(e)
            continue
        out.append(Decoded(img.width, img.height, d.scaled))
    return out
