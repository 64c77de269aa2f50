"""Read one image file as Pillow sees it, with limits of its own: what `featx extract` opens.

Every limit belongs to the call, not to Pillow's process-wide settings: `max_pixels` is checked
from the header; a file is read at most HEADER_BYTES before it names an image, and then at
most what such an image can take (so a 20 GB file with a JPEG header is refused after a
bounded read); a truncated image is refused, never decoded half-grey; a FIFO is never waited
on; and a run that stops (Ctrl-C, SIGTERM) makes a read in progress give up at once.
Torch-free: discovery asks `is_image` here.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import threading
import zlib

import numpy as np
from PIL import Image, ImageOps

# A file whose first HEADER_BYTES read do not describe an image is refused. Real headers (EXIF,
# ICC profiles, XMP, PNG text chunks) take far less; Pillow scans junk before a JPEG marker a
# byte at a time (~15 MB/s of one CPU), so this also bounds what a fake JPEG costs (about 1 s).
HEADER_BYTES = 16 << 20
# After the header, an image may take what its pixels could in the most wasteful encoding
# (16-bit RGBA uncompressed is 8 bytes a pixel), plus room for trailing metadata.
BYTES_PER_PIXEL = 8
SLACK_BYTES = 64 << 20
# Reads are made in pieces of at most this size, so a stop or the budget is noticed soon.
READ_PIECE = 1 << 20
BUFFER = 1 << 16


class ImageError(Exception):
    """One image could not become a row; `stage` says where it failed."""

    def __init__(self, stage: str, error: str, message: str):
        super().__init__(message)
        self.stage, self.error, self.message = stage, error, message


class Stopped(Exception):
    """The run stopped (Ctrl-C, SIGTERM) while an image was being read."""


class _OverBudget(Exception):
    """Pillow asked for more of a file than the image it describes can take."""


class _Source(io.RawIOBase):
    """The file under Pillow's reads: counted against a budget, and refused once the run stops.

    Seeks cost nothing (a TIFF may keep its header at the end of the file); bytes read count.
    """

    # A plain attribute, not IOBase's property: a BufferedReader asks its raw stream whether
    # it is closed on every read, and Pillow reads a JPEG's junk a byte at a time.
    closed = False

    def __init__(self, fd: int, stop: threading.Event | None):
        self._file = io.FileIO(fd, "rb", closefd=False)
        self.stop, self.budget, self.used = stop, HEADER_BYTES, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._file.seek(pos, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer) -> int:
        if self.stop is not None and self.stop.is_set():
            raise Stopped("the run is stopping")
        if self.used >= self.budget:
            raise _OverBudget(self.used)
        view = memoryview(buffer)
        n = self._file.readinto(view[: min(len(view), READ_PIECE, self.budget - self.used)])
        self.used += n or 0
        return n

    def close(self) -> None:
        self.closed = True
        self._file.close()


class _Watched(io.BufferedReader):
    """What Pillow decodes through: notes a read that finds nothing left, i.e. Pillow asking for
    more than the file holds, which it fills with grey when the host allows truncated images."""

    ran_out = False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if not data and size != 0:
            self.ran_out = True
        return data


def _open(file: str | os.PathLike) -> int:
    """A descriptor of `file` if it is a regular file holding something; else ImageError."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer.
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        if os.path.islink(file):
            raise ImageError(
                "read", "BrokenLink", f"a symbolic link to {os.readlink(file)}, which does not exist"
            ) from None
        raise ImageError("read", "FileNotFoundError", "the file vanished before it was read") from None
    except PermissionError as e:
        raise ImageError("read", "PermissionError", f"cannot read the file: {e.strerror}") from None
    except IsADirectoryError:
        raise ImageError("read", "IsADirectoryError", "a folder, not an image file") from None
    except OSError as e:
        raise ImageError("read", type(e).__name__, f"cannot open the file: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_a_file(st.st_mode)
        if st.st_size == 0:
            raise ImageError("decode", "EmptyFile", "the file is empty (0 bytes)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def not_a_file(mode: int) -> ImageError:
    """The failure of a FIFO, socket or device where an image was expected (never opened to wait)."""
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "something else"
    )
    return ImageError("read", "NotAFile", f"{kind}, not a regular file: featx reads only files")


def broken_link(file: str | os.PathLike) -> ImageError:
    """The failure of a symbolic link whose target does not exist."""
    return ImageError("read", "BrokenLink", f"a symbolic link to {os.readlink(file)}, which does not exist")


def _identify(fp: io.BufferedReader, formats: list[str] | None = None) -> Image.Image:
    """Image.open's format search without its process-wide bomb check (featx checks per call).

    Pillow refuses or warns about large images by its global `Image.MAX_IMAGE_PIXELS`; featx
    must neither change that global nor let it override `--max-pixels`, so it asks Pillow's
    registered openers (`Image.OPEN`, the table `Image.register_open` fills) directly.
    """
    prefix = fp.read(16)
    tried: set[str] = set()
    for load_plugins in (Image.preinit, Image.init):
        load_plugins()
        for fmt in [f for f in (formats or Image.ID) if f not in tried]:
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            try:
                if accept is not None and accept(prefix) is not True:
                    continue
            except Exception:  # a check that assumes more bytes than a tiny file has: not this format
                continue
            fp.seek(0)
            try:
                return factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error, EOFError):
                continue
    raise Image.UnidentifiedImageError("cannot identify image file")


def _header(fp: io.BufferedReader, formats: list[str] | None = None) -> Image.Image:
    """The image `fp` holds, from its header alone; ImageError if none within its budget."""
    try:
        return _identify(fp, formats)
    except Stopped:
        raise
    except Image.DecompressionBombError as e:
        # Some of Pillow's openers (WebP, GIF frames) apply its process-wide limit themselves.
        raise ImageError("decode", "TooManyPixels", f"{e}; Pillow refuses to open it") from None
    except _OverBudget:
        raise ImageError(
            "decode",
            "NoImageHeader",
            f"no image header in the first {HEADER_BYTES >> 20} MiB of the file; not an image",
        ) from None
    except Exception as e:
        raise ImageError("decode", type(e).__name__, f"not an image Pillow can open: {e}") from None


def _format(fd: int, stop: threading.Event | None) -> str:
    """Which of Pillow's formats the file holds, after at most HEADER_BYTES read at C speed.

    Pillow skips junk before a JPEG marker a byte at a time: through BufferedReader's own read
    that costs a fraction of a Python-level read per byte.
    """
    with io.BufferedReader(_Source(fd, stop), BUFFER) as fp, _header(fp) as img:
        return img.format


def is_image(file: str | os.PathLike) -> bool:
    """Whether Pillow recognises the header of `file` (no pixels decoded, no size limit).

    Raises ImageError when the file cannot be read at all (permission, not a regular file).
    """
    fd = _open(file)
    try:
        _format(fd, None)
        return True
    except ImageError as e:
        if e.stage == "read":
            raise
        return False
    finally:
        os.close(fd)


def open_upright(file: str | os.PathLike, max_pixels: int, stop: threading.Event | None = None) -> Image.Image:
    """Open, refuse oversized images from the header alone, decode the first frame upright.

    Both limits belong to the call, not to Pillow's globals: `max_pixels` is checked from the
    header, and a truncated file is refused (never decoded half-grey) whatever the host
    application set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` to. Once `stop` is set, a read in
    progress raises Stopped.
    """
    fd = _open(file)
    try:
        fmt = _format(fd, stop)
        os.lseek(fd, 0, os.SEEK_SET)
        source = _Source(fd, stop)
        with _Watched(source, BUFFER) as fp, _header(fp, [fmt]) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    "decode",
                    "TooManyPixels",
                    f"{w}x{h} = {w * h} pixels is over --max-pixels {max_pixels}; raise --max-pixels to include it",
                )
            source.budget = source.used + SLACK_BYTES + BYTES_PER_PIXEL * w * h
            try:
                img.seek(0)  # animated GIF / WebP: the first frame
                fp.ran_out = False
                img.load()
            except Stopped:
                raise
            except Image.DecompressionBombError as e:  # a frame larger than the header said
                raise ImageError("decode", "TooManyPixels", f"{e}; Pillow refuses to open it") from None
            except _OverBudget:
                raise ImageError(
                    "decode", "TooLarge", f"the file holds more data than a {w}x{h} image can; not an image"
                ) from None
            except Exception as e:
                raise ImageError("decode", type(e).__name__, f"cannot decode: {e}") from None
            if fp.ran_out or (fmt == "PNG" and not _png_data_complete(fd)):
                # Pillow fills the missing part with grey when the host allows truncated images,
                # and a PNG whose compressed data ends early leaves its last rows black.
                raise ImageError("decode", "Truncated", "image file is truncated; the file is incomplete")
            try:
                return upright_rgb(img)
            except Exception as e:
                raise ImageError("decode", type(e).__name__, f"cannot decode: {e}") from None
    finally:
        os.close(fd)


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png_data_complete(fd: int) -> bool:
    """Whether a PNG's IDAT data inflates to every row its header promises (PNG spec, 10-11).

    Pillow stops quietly when the compressed stream ends before the last row, leaving the
    rest black; this counts the inflated bytes instead (nothing is kept).
    """
    f = io.FileIO(fd, "rb", closefd=False)
    f.seek(8)
    head = f.read(8 + 13)
    if len(head) < 21 or head[4:8] != b"IHDR":
        return False
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", head[8:21])
    bits = depth * _PNG_CHANNELS.get(color, 4)

    def size(w: int, h: int) -> int:
        return h * (1 + math.ceil(w * bits / 8)) if w and h else 0

    if interlace:
        expected = sum(
            size(max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))) for x0, y0, dx, dy in _ADAM7
        )
    else:
        expected = size(width, height)
    f.seek(8 + 8 + 13 + 4)
    inflate = zlib.decompressobj()
    got, seen_idat = 0, False
    while got < expected:
        chunk = f.read(8)
        if len(chunk) < 8:
            break
        length, kind = struct.unpack(">I4s", chunk)
        if kind != b"IDAT":
            if seen_idat:
                break  # IDAT chunks are consecutive: the data is over
            f.seek(length + 4, os.SEEK_CUR)
            continue
        seen_idat = True
        left = length
        while left and got < expected:
            data = f.read(min(left, READ_PIECE))
            if not data:
                return False
            left -= len(data)
            while data and got < expected:
                try:
                    got += len(inflate.decompress(data, min(expected - got, READ_PIECE)))
                except zlib.error:
                    return False
                data = inflate.unconsumed_tail
        f.seek(left + 4, os.SEEK_CUR)
    return got >= expected


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
