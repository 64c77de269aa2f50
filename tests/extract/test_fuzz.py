"""A seeded fuzz of `featx extract` (issue 22.19): thousands of broken and odd image files in one
folder. The run ends (no hang, no traceback), every file ends as exactly one row or one errors
entry, and a rerun changes nothing. What earlier rounds found is kept below as named cases.

The files are small mutations of real JPEG, PNG, GIF, WebP and TIFF files: flipped bytes, cut
tails, sizes forged in their headers, junk appended, extensions swapped; and odd names (spaces,
non-UTF-8 bytes, backslashes, newlines, a leading dash, 250 bytes long).
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import featx
from featx import store
from featx.extract.decode import ImageError, open_upright
from featx.extract.discover import as_text
from tests.conftest import smooth_image
from tests.extract.test_hostile_inputs import run_in_thread

# Pillow warns about the damage it meets in TIFF tags and EXIF: expected here, per file.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SEED = 20240622
N_FILES = 2000
# Decoding stays cheap: a header forged to a large size is refused rather than decoded.
MAX_PIXELS = 1_000_000
SETTINGS = dict(
    model="vgg11", weights="random", seed=0, layer="pool5", scales=(32,), precision="fp32", flip=False,
    max_pixels=MAX_PIXELS, batch_size=64, rows_per_group=256,
)  # fmt: skip
CLI = [
    "--model", "vgg11", "--weights", "random", "--layer", "pool5", "--scales", "32", "--precision", "fp32",
    "--no-flip", "--max-pixels", str(MAX_PIXELS), "--batch-size", "64", "--rows-per-group", "256", "--quiet",
]  # fmt: skip
EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp", ".JPG")


# -- real files to start from ----------------------------------------------------------------


def originals(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Small real files of every format the fuzz mutates: (format, bytes)."""
    made = []

    def save(fmt: str, img: Image.Image, **kw) -> None:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        made.append((fmt, buf.getvalue()))

    for w, h in ((24, 18), (17, 31), (48, 40), (5, 3)):
        rgb = smooth_image(rng, w, h)
        save("JPEG", rgb, quality=85)
        save("JPEG", rgb, quality=70, progressive=True)
        save("PNG", rgb)
        save("PNG", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), bits=3)
        rgba = rgb.convert("RGBA")
        rgba.putalpha(100)
        save("PNG", rgba)
        save("PNG", Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
        save("GIF", rgb.convert("P"), save_all=True, append_images=[smooth_image(rng, w, h).convert("P")])
        save("WEBP", rgb, quality=80)
        save("WEBP", rgb, lossless=True)
        save("TIFF", rgb)
        save("TIFF", rgb, compression="tiff_lzw")
        save("TIFF", rgb, compression="tiff_adobe_deflate")
        save("BMP", rgb)
    return made


# -- mutations --------------------------------------------------------------------------------


def flip_bytes(data: bytes, rng) -> bytes:
    b = bytearray(data)
    head = rng.random() < 0.6  # headers are where parsers go wrong: flip there more often
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(0, min(len(b), 96) if head else len(b)))
        b[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def cut_tail(data: bytes, rng) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def append_junk(data: bytes, rng) -> bytes:
    return data + rng.bytes(int(rng.integers(1, 4000)))


FORGED = (0, 1, 2, 255, 4096, 65535, 1 << 20, (1 << 31) - 1, 1 << 31, (1 << 32) - 1)


def forge_size(data: bytes, fmt: str, rng) -> bytes:
    """The width or height in the format's header set to a hostile value (where it can be found)."""
    try:
        return _forge(bytearray(data), fmt, rng)
    except (struct.error, IndexError, ValueError):  # a header an earlier mutation already cut
        return data


def _forge(b: bytearray, fmt: str, rng) -> bytes:
    value = int(rng.choice(FORGED))
    if fmt == "JPEG":
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            i = b.find(marker)
            if i >= 0:
                at = i + 5 + 2 * int(rng.integers(0, 2))  # height, then width (16 bits each)
                b[at : at + 2] = struct.pack(">H", value & 0xFFFF)
    elif fmt == "PNG":
        at = 16 + 4 * int(rng.integers(0, 2))
        b[at : at + 4] = struct.pack(">I", value & 0xFFFFFFFF)
        if rng.random() < 0.7:  # a consistent CRC, so the forgery gets past the chunk check
            b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    elif fmt == "GIF":
        at = (6 if rng.random() < 0.5 else b.find(b",") + 5) + 2 * int(rng.integers(0, 2))
        if 0 <= at < len(b) - 1:
            b[at : at + 2] = struct.pack("<H", value & 0xFFFF)
    elif fmt == "WEBP":
        i = b.find(b"VP8X")
        if i >= 0:
            at = i + 12 + 3 * int(rng.integers(0, 2))
            b[at : at + 3] = (value & 0xFFFFFF).to_bytes(3, "little")
        elif (i := b.find(b"VP8 ")) >= 0:
            at = i + 14 + 2 * int(rng.integers(0, 2))
            b[at : at + 2] = struct.pack("<H", value & 0x3FFF)
        elif (i := b.find(b"VP8L")) >= 0:
            b[i + 9 : i + 13] = struct.pack("<I", value & 0xFFFFFFFF)
    elif fmt == "TIFF":
        ifd = struct.unpack("<I", b[4:8])[0]
        count = struct.unpack("<H", b[ifd : ifd + 2])[0] if ifd + 2 <= len(b) else 0
        tags = (256, 257, 273, 279)  # width, length, strip offsets, strip byte counts
        chosen = int(rng.choice(tags))
        for k in range(count):
            at = ifd + 2 + 12 * k
            if struct.unpack("<H", b[at : at + 2])[0] == chosen:
                b[at + 8 : at + 12] = struct.pack("<I", value & 0xFFFFFFFF)
    elif fmt == "BMP":
        at = 18 + 4 * int(rng.integers(0, 2))
        b[at : at + 4] = struct.pack("<i", (value & 0x7FFFFFFF) * (-1 if rng.random() < 0.3 else 1))
    return bytes(b)


def mutate(fmt: str, data: bytes, rng) -> bytes:
    ops = [flip_bytes, cut_tail, append_junk, lambda d, r: forge_size(d, fmt, r)]
    for _ in range(int(rng.integers(1, 3))):
        if data:
            data = ops[int(rng.integers(0, len(ops)))](data, rng)
    return data


# -- names ------------------------------------------------------------------------------------

ODD = [
    b"with space",
    "naïve café 写真".encode(),
    b"caf\xe9",  # Latin-1: not UTF-8
    b"\xff\xfe\x80",
    b"back\\slash",
    b"new\nline",
    b"-leading-dash",
    b"tab\there",
    b"%s%n%x",
    b"'quote\"",
    b"x" * 230,
]


def name_for(i: int, rng) -> bytes:
    stem = ODD[i % len(ODD)] + b"_" + str(i).encode() if rng.random() < 0.4 else b"f%05d" % i
    return stem + EXTENSIONS[int(rng.integers(0, len(EXTENSIONS)))].encode()


def make_fuzz_folder(folder: Path, n: int = N_FILES, seed: int = SEED) -> set[str]:
    """`n` mutated image files (and a few extension-less ones) in `folder`; the recorded paths
    featx must account for, each by one row or one errors entry."""
    rng = np.random.default_rng(seed)
    sources = originals(rng)
    folder.mkdir(parents=True)
    root = os.fsencode(folder)
    expected: set[str] = set()
    for i in range(n):
        fmt, data = sources[int(rng.integers(0, len(sources)))]
        roll = rng.random()
        if roll < 0.04:
            data = b""
        elif roll < 0.08:
            data = data[: int(rng.integers(1, 40))]  # a header and nothing more
        elif roll < 0.85:
            data = mutate(fmt, data, rng)
        name = name_for(i, rng)  # extensions drawn at random: a PNG named .jpg is common
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        expected.add(as_text(os.fsdecode(name)))
    # Extension-less: a real image must be found, text must not be.
    for i in range(20):
        fmt, data = sources[i % len(sources)]
        (folder / f"image_{i:04d}").write_bytes(data)
        expected.add(f"image_{i:04d}")
        (folder / f"notes_{i:04d}").write_bytes(b"plain text, no image\n" * (i + 1))
    (folder / ".hidden.jpg").write_bytes(sources[0][1])  # hidden: skipped, not accounted for
    return expected


def accounted(out: Path) -> tuple[list[str], list[str]]:
    rows = featx.read_features(out, columns=["path"])["path"].tolist()
    errors_file = store.errors_path(out)
    errors = pq.read_table(errors_file).column("path").to_pylist() if errors_file.exists() else []
    return rows, errors


@pytest.mark.slow
def test_fuzzed_files_end_as_one_row_or_one_error_each_and_a_rerun_changes_nothing(tmp_path):
    folder = tmp_path / "fuzz"
    expected = make_fuzz_folder(folder)
    out = tmp_path / "f.parquet"
    result = run_in_thread(lambda: featx.extract_features(folder, out, **SETTINGS), timeout=900)
    rows, errors = accounted(out)
    assert len(rows) == len(set(rows)) and len(errors) == len(set(errors))
    assert not set(rows) & set(errors)
    assert set(rows) | set(errors) == expected
    assert (result.rows, result.failures) == (len(rows), len(errors))
    assert 0.2 * len(expected) < len(rows) < 0.9 * len(expected)  # the fuzz makes both kinds
    before = (out.read_bytes(), store.errors_path(out).read_bytes())
    # The same command, as a user runs it: no traceback, nothing changed.
    cmd = [sys.executable, "-m", "featx", "extract", str(folder), "-o", str(out), *CLI]
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0 and "Traceback" not in rerun.stderr, rerun.stderr
    assert f"{len(rows)} images (0 new), {len(errors)} failures" in rerun.stdout
    assert (out.read_bytes(), pq.read_table(store.errors_path(out))) == (
        before[0],
        pq.read_table(io.BytesIO(before[1])),
    )


@pytest.mark.parametrize("seed", range(3))
def test_a_small_fuzz_decodes_or_refuses_every_file(tmp_path, seed):
    """The fast tier's share: a few hundred fuzzed files through decode alone (no net, no store)."""
    folder = tmp_path / "fuzz"
    make_fuzz_folder(folder, n=150, seed=seed)

    def decode_all():
        outcome = {}
        for name in os.listdir(os.fsencode(folder)):
            path = os.path.join(os.fsencode(folder), name)
            try:
                img = open_upright(os.fsdecode(path), MAX_PIXELS)
                assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
                outcome[name] = "row"
            except ImageError as e:
                assert e.stage in ("read", "decode") and e.message, e
                outcome[name] = e.error
        return outcome

    outcome = run_in_thread(decode_all, timeout=300)
    assert "row" in outcome.values() and len(set(outcome.values())) > 3


# -- what earlier rounds found, kept as named cases ------------------------------------------


@pytest.mark.parametrize("magic", [b"\xff", b"\x89PN", b"BM", b"II*", b"GIF", b"RIFF"])
def test_a_file_of_a_few_bytes_is_no_image_rather_than_a_struct_error(tmp_path, magic):
    """Found: some of Pillow's format checks unpack more bytes than a 1-3 byte file has, and their
    struct.error ("unpack_from requires a buffer...") ended the format search as the reason."""
    path = tmp_path / "tiny.jpg"
    path.write_bytes(magic)
    with pytest.raises(ImageError) as e:
        open_upright(path, MAX_PIXELS)
    assert (e.value.error, e.value.message) == (
        "UnidentifiedImageError",
        "not an image Pillow can open: cannot identify image file",
    )


def test_a_webp_whose_header_claims_a_huge_canvas_is_too_many_pixels(tmp_path):
    """Found: Pillow's WebP opener applies its own process-wide bomb limit; the file is refused
    as TooManyPixels like any image over --max-pixels, not as a Pillow DecompressionBombError."""
    buf = io.BytesIO()
    smooth_image(np.random.default_rng(0), 24, 18).save(buf, format="WEBP", lossless=True)
    data = bytearray(buf.getvalue())
    i = data.find(b"VP8L")
    data[i + 9 : i + 13] = b"\xff\xff\xff\x0f"  # 14-bit width and height: 16384 x 16384
    path = tmp_path / "huge.webp"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as e:
        open_upright(path, 89_478_485)
    assert (e.value.stage, e.value.error) == ("decode", "TooManyPixels")
    assert "268435456 pixels" in e.value.message
