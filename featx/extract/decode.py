"""Decode an image upright as 8-bit RGB and rescale it so its smaller side is Q.

Paper, Appendix B: "the image is isotropically rescaled to the smallest side Q". The resize
is torchvision's (bilinear, antialiased) on the uint8 tensor, as `transforms.v2.Resize(Q)`:
the same call into torch (`resize`, held to torchvision's pixels by the tests), made without
importing torchvision, whose import costs a short run about 1.2 s.
"""

from __future__ import annotations

import platform
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from featx.extract.imagefile import ImageError, Stopped, open_upright, to_rgb, upright_rgb

# Reading files lives in featx.extract.imagefile (torch-free); its names are also decode's.
__all__ = [
    "MAX_ASPECT",
    "RESIZE",
    "Decoded",
    "ImageError",
    "Stopped",
    "crop_aspect",
    "crop_box",
    "crop_regions",
    "decode",
    "decode_image",
    "decode_regions",
    "open_upright",
    "pil_to_tensor",
    "rescale",
    "resize",
    "scaled_size",
    "to_rgb",
    "upright_rgb",
]

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


@dataclass
class Decoded:
    width: int  # upright, after EXIF orientation
    height: int
    scaled: dict[int, torch.Tensor]  # Q -> uint8 [3, h, w], smaller side Q


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
    return resize(image, h, w)


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, height, width], bilinear and antialiased, pixel for pixel as
    torchvision.transforms.v2.functional.resize (torchvision 0.16-0.29 resize_image): torch's
    uint8 kernel where torch has a vectorised one (AVX2/AVX-512, ARM), else in float32, rounded."""
    if (height, width) == tuple(image.shape[-2:]):
        return image
    x = image.reshape(1, *image.shape[-3:])
    if x.is_contiguous(memory_format=torch.channels_last) and x.stride(0) != x.numel():
        # As torchvision does: so that interpolate keeps a channels-last image channels-last.
        x = x.as_strided(x.shape, (x.numel(), *x.stride()[1:]))
    native = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
        "aarch64",
        "arm64",
    )
    if image.device.type == "cpu" and native:
        out = F.interpolate(x, size=[height, width], mode="bilinear", align_corners=False, antialias=True)
    else:
        out = F.interpolate(x.float(), size=[height, width], mode="bilinear", align_corners=False, antialias=True)
        out = out.round_().to(torch.uint8)
    return out.reshape((*image.shape[:-2], height, width))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def decode(
    file, scales: tuple[int, ...], max_pixels: int, bucket: int = 0, stop: threading.Event | None = None
) -> Decoded:
    """Read one image and rescale it to every Q in `scales`; raises ImageError (Stopped once `stop` is set)."""
    return decode_image(open_upright(file, max_pixels, stop), scales, bucket)


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

    A failure to read the image raises ImageError; a bad box is returned as that box's ImageError.
    """
    return crop_regions(open_upright(file, max_pixels), boxes, scales, bucket)


def crop_regions(
    img: Image.Image, boxes: list[tuple[int, int, int, int]], scales: tuple[int, ...], bucket: int = 0
) -> list[Decoded | ImageError]:
    """Each box's crop of an upright RGB image rescaled to every Q, as a whole image would be.

    The crop is taken from the upright 8-bit RGB image before rescaling, so the crop's smaller
    side becomes Q. Width and height are the whole image's; a bad box is that box's ImageError.
    """
    out: list[Decoded | ImageError] = []
    for box in boxes:
        try:
            d = decode_image(crop_box(img, box), scales, bucket)
        except ImageError as e:
            out.append(e)
            continue
        out.append(Decoded(img.width, img.height, d.scaled))
    return out
