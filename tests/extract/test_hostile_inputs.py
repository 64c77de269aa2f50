"""Inputs that broke featx (issue 22): every file gets a row or a reason, none stalls a run.

Names that are not UTF-8, broken links, FIFOs, images too large for Pillow's own limit without
an extension, empty and truncated files, a 20 GB fake JPEG (a sparse file: no disk used),
thousands of regions of one image, and --scales written with spaces.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile
from typer.testing import CliRunner

import featx
from featx import store
from featx.cli import app
from featx.extract import imagefile
from featx.extract.config import ExtractConfig
from featx.extract.decode import ImageError, decode, open_upright
from featx.extract.discover import as_text, discover
from featx.extract.job import plan_job
from featx.extract.local import LocalRun
from tests.conftest import smooth_image
from tests.test_cli_checks import refused

SETTINGS = dict(model="vgg11", weights="random", seed=0, layer="pool5", scales=(32,), precision="fp32")
CLI = ["--model", "vgg11", "--weights", "random", "--layer", "pool5", "--scales", "32", "--precision", "fp32"]
MAX = 89_478_485
runner = CliRunner()
posix_names = pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="needs byte file names (Linux)")
posix_only = pytest.mark.skipif(os.name != "posix", reason="needs POSIX links and FIFOs")


def jpeg(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    smooth_image(np.random.default_rng(seed), *size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(seed: int = 0, size: tuple[int, int] = (40, 30), **kw) -> bytes:
    buf = io.BytesIO()
    smooth_image(np.random.default_rng(seed), *size).save(buf, format="PNG", **kw)
    return buf.getvalue()


def featx_cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    """`featx ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "featx", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def errors_of(out: Path) -> dict[str, dict]:
    table = pq.read_table(store.errors_path(out))
    return {r["path"]: r for r in table.to_pylist()}


def run_in_thread(fn, timeout: float = 300):
    """fn() with a deadline: a hang (a FIFO waited on) fails the test instead of stalling it."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the run did not finish: something was waited on"
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- 1: names that are not UTF-8 ------------------------------------------------------------


def test_as_text_escapes_only_what_is_not_utf8():
    assert as_text("naïve café 写真.jpg") == "naïve café 写真.jpg"
    assert as_text(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"
    assert as_text(os.fsdecode(b"\xff\xfe/x.jpg")) == "\\xff\\xfe/x.jpg"
    assert as_text("a\ud800b") == "a\\ud800b"  # a lone surrogate of another origin


@posix_names
def test_names_that_are_not_utf8_are_described_under_their_escaped_text_and_resume(tmp_path):
    """A Latin-1 file name and folder name: rows under `\\xNN` text, the same on every run."""
    root = tmp_path / "in"
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "ok.jpg").write_bytes(jpeg(1))
    (root / "cls" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(jpeg(2))
    latin = root / os.fsdecode(b"\xe9t\xe9")
    latin.mkdir()
    (latin / "x.jpg").write_bytes(jpeg(3))
    # A real name that reads like the escaped text of another: that other is listed, not lost.
    (root / "cls" / "a\\xff.jpg").write_bytes(jpeg(4))
    (root / "cls" / os.fsdecode(b"a\xff.jpg")).write_bytes(jpeg(5))
    out = tmp_path / "f.parquet"
    first = featx_cli("extract", root, "-o", out, *CLI, "--quiet")
    assert first.returncode == 0, first.stderr
    rows = featx.read_features(out).set_index("path")
    assert set(rows.index) == {"cls/a\\xff.jpg", "cls/caf\\xe9.jpg", "cls/ok.jpg", "\\xe9t\\xe9/x.jpg"}
    assert rows.loc["\\xe9t\\xe9/x.jpg", "label"] == "\\xe9t\\xe9"
    collision = errors_of(out)["cls/a\\xff.jpg (not UTF-8)"]
    assert collision["error"] == "NameCollision" and "rename one of them" in collision["message"]
    # The same command again: nothing to do, every image found under the same text.
    again = featx_cli("extract", root, "-o", out, *CLI, "--quiet")
    assert again.returncode == 0, again.stderr
    assert "4 images (0 new), 1 failures" in again.stdout


# -- 6: every file discovery looks at gets a row or an errors entry ----------------------------


@posix_only
def test_every_file_discovery_looks_at_gets_a_row_or_a_reason(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "good.jpg").write_bytes(jpeg(1))
    # 20000 x 20000 one-bit PNG without an extension: beyond Pillow's own bomb limit (2 x 89 M
    # pixels), so Image.open refuses it; featx must still find it and apply --max-pixels.
    Image.new("1", (20000, 20000)).save(root / "scan_0001", format="PNG")
    (root / "small_0002").write_bytes(jpeg(2, (300, 200)))  # extension-less, over --max-pixels 50000
    (root / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(root / "pipe.jpg")
    os.mkfifo(root / "pipe")  # not named like an image: never opened, not listed
    (root / "notes.txt").write_text("not an image")
    out = tmp_path / "f.parquet"
    result = run_in_thread(lambda: featx.extract_features(root, out, max_pixels=50_000, **SETTINGS))
    assert (result.rows, result.failures) == (1, 4)
    assert list(featx.read_features(out)["path"]) == ["good.jpg"]
    errors = errors_of(out)
    assert {p: (e["stage"], e["error"]) for p, e in errors.items()} == {
        "scan_0001": ("decode", "TooManyPixels"),
        "small_0002": ("decode", "TooManyPixels"),
        "gone.jpg": ("read", "BrokenLink"),
        "pipe.jpg": ("read", "NotAFile"),
    }
    assert "nowhere.jpg, which does not exist" in errors["gone.jpg"]["message"]
    assert "FIFO" in errors["pipe.jpg"]["message"]
    # A rerun retries the failures and finds the same.
    again = run_in_thread(lambda: featx.extract_features(root, out, max_pixels=50_000, **SETTINGS))
    assert (again.rows, again.failures) == (1, 4)


@posix_only
def test_a_fifo_given_as_an_image_is_never_opened_to_wait(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageError, match="FIFO"):
        run_in_thread(lambda: open_upright(tmp_path / "pipe.png", MAX), timeout=30)
    (item,) = discover([tmp_path / "pipe.png"])
    assert item.failure[:2] == ("read", "NotAFile")


# -- 7: --scales ------------------------------------------------------------------------------


def test_scales_separated_by_spaces_are_read_as_scales(tmp_path, samples):
    out = tmp_path / "f.parquet"
    args = ["extract", str(samples / "crab"), "-o", str(out), *CLI[:-4], "--scales", "32 48", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert featx.read_provenance(out)["scales"] == [32, 48]


@pytest.mark.parametrize(
    "scales, message",
    [
        ("256384512", "--scales 256384512: every image rescaled to it would hold over --max-pixels"),
        ("256;384", "is not a list of integers"),
    ],
)
def test_a_scale_no_image_could_use_is_refused_before_torch_loads(tmp_path, samples, scales, message):
    code, torch, error = refused("extract", samples, "-o", tmp_path / "f.parquet", "--scales", scales, cache=tmp_path)
    lines = [line for line in error.splitlines() if line.startswith("featx: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], error
    assert not torch


# -- 8: a huge fake JPEG ----------------------------------------------------------------------

FAKE_JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def fake_jpeg(path: Path, size: int = 20 << 30) -> Path:
    """A JPEG header and then `size` bytes of nothing: a sparse file, no disk used."""
    with open(path, "wb") as f:
        f.write(FAKE_JPEG_HEAD)
        f.truncate(size)
    return path


def bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts reads in /proc (Linux)")
def test_a_huge_file_with_a_jpeg_header_is_refused_after_a_bounded_read(tmp_path, monkeypatch):
    monkeypatch.setattr(imagefile, "HEADER_BYTES", 1 << 20)  # the mechanism; the slow test runs the default
    big = fake_jpeg(tmp_path / "big.jpg")
    before = bytes_read()
    with pytest.raises(ImageError) as e:
        decode(big, (224,), MAX)
    assert (e.value.stage, e.value.error) == ("decode", "NoImageHeader")
    assert "no image header in the first 1 MiB" in e.value.message
    assert bytes_read() - before < 8 << 20


def test_header_scanning_runs_at_pillows_speed_not_through_python_per_byte(tmp_path):
    """Pillow skips junk before a JPEG marker a byte at a time: those reads stay in C (issue 22.8:
    a Python-level read per byte made it 3x slower). Counted as Python calls into featx."""
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(FAKE_JPEG_HEAD + bytes(1 << 20))
    calls = {"n": 0}
    here = str(Path(featx.__file__).parent)

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(here):
            calls["n"] += 1

    sys.setprofile(profile)
    try:
        with pytest.raises(ImageError):
            open_upright(junk, MAX)
    finally:
        sys.setprofile(None)
    assert calls["n"] < 1000, calls  # a Python-level read per byte would be over a million


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="sparse files and SIGTERM")
def test_sigterm_stops_a_run_reading_huge_files_within_seconds(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "a_good.jpg").write_bytes(jpeg(1))
    for i in range(200):  # minutes of reading without the stop, even on a fast machine
        fake_jpeg(root / f"big_{i:03d}.jpg")
    out = tmp_path / "f.parquet"
    proc = subprocess.Popen(
        [sys.executable, "-m", "featx", "extract", str(root), "-o", str(out), *CLI, "--quiet", "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        fds = Path(f"/proc/{proc.pid}/fd")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if any("big_" in os.readlink(fd) for fd in fds.iterdir()):
                    break
            except OSError:
                pass
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr and "rerun the same command" in stderr
    finally:
        if proc.poll() is None:  # the run did not stop: do not leave it reading
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="sparse files")
def test_huge_fake_jpegs_are_refused_per_file_and_the_run_finishes(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "good.jpg").write_bytes(jpeg(1))
    fake_jpeg(root / "big.jpg")
    # A real header of a 4000x3000 image, then 20 GB of nothing: read no further than its pixels
    # can take (libjpeg decodes zeros as image data, so it may even become a row of garbage).
    head = jpeg(2, (4000, 3000))
    with open(root / "long.jpg", "wb") as f:
        f.write(head[: head.index(b"\xff\xda") + 20])
        f.truncate(20 << 30)
    out = tmp_path / "f.parquet"
    result = featx_cli("extract", root, "-o", out, *CLI, "--quiet")
    assert result.returncode == 0, result.stderr
    errors = errors_of(out)
    assert errors["big.jpg"]["error"] == "NoImageHeader"
    rows = set(featx.read_features(out)["path"])
    assert "good.jpg" in rows and ("long.jpg" in rows) != ("long.jpg" in errors)


# -- 9: empty and truncated files -------------------------------------------------------------


def short_png(rows_kept: int, complete_stream: bool) -> bytes:
    """A real 40x30 RGB PNG whose image data ends early: the zlib stream holds only `rows_kept`
    rows, as a complete stream (Pillow stops quietly, rows left black) or cut mid-stream."""
    data = png(3)
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    raw = zlib.decompress(data[start + 8 : start + 8 + length])
    stride = len(raw) // 30
    idat = zlib.compress(raw[: rows_kept * stride]) if complete_stream else zlib.compress(raw)[: length // 2]
    chunk = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return data[:start] + chunk + data[start + 12 + length :]


@pytest.mark.parametrize("complete_stream", [True, False], ids=["short-stream", "cut-stream"])
@pytest.mark.parametrize("host_allows_truncated", [False, True])
def test_a_png_whose_image_data_ends_early_is_refused(tmp_path, monkeypatch, complete_stream, host_allows_truncated):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", host_allows_truncated)
    path = tmp_path / "short.png"
    path.write_bytes(short_png(12, complete_stream))
    with pytest.raises(ImageError) as e:
        open_upright(path, MAX)
    assert e.value.stage == "decode" and "truncated" in e.value.message


def test_complete_pngs_still_decode(tmp_path):
    pixels = np.asarray(smooth_image(np.random.default_rng(2), 37, 23))
    for name, data in {
        "plain.png": png(1),
        "palette.png": _palette_png(),
        "gray16.png": _gray16_png(),
        "adam7.png": _adam7_png(pixels),
    }.items():
        (tmp_path / name).write_bytes(data)
        assert open_upright(tmp_path / name, MAX).mode == "RGB", name
    assert np.array_equal(np.asarray(open_upright(tmp_path / "adam7.png", MAX)), pixels)
    (tmp_path / "adam7_short.png").write_bytes(_adam7_png(pixels, drop=1))
    with pytest.raises(ImageError, match="truncated"):
        open_upright(tmp_path / "adam7_short.png", MAX)


def _adam7_png(rgb: np.ndarray, drop: int = 0) -> bytes:
    """An interlaced (Adam7) RGB PNG, written by hand (Pillow writes none); `drop` rows of the
    last pass left out of a complete zlib stream."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b"".join(b"".join(b"\x00" + row.tobytes() for row in rgb[y0::dy, x0::dx]) for x0, y0, dx, dy in passes)
    raw = raw[: len(raw) - drop * (1 + 3 * rgb.shape[1])]
    h, w = rgb.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _palette_png() -> bytes:
    buf = io.BytesIO()
    smooth_image(np.random.default_rng(4), 33, 17).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(
        buf, format="PNG", bits=2
    )
    return buf.getvalue()


def _gray16_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(21 * 13, dtype=np.uint16).reshape(13, 21) * 200).save(buf, format="PNG")
    return buf.getvalue()


def test_a_zero_byte_image_is_reported_as_empty(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError) as e:
        decode(tmp_path / "empty.jpg", (224,), MAX)
    assert (e.value.stage, e.value.error, e.value.message) == ("decode", "EmptyFile", "the file is empty (0 bytes)")


# -- 5: thousands of regions of one image ------------------------------------------------------


def test_regions_are_decoded_a_window_of_boxes_ahead_not_a_whole_image_of_them(tmp_path, monkeypatch):
    """An image with 400 boxes: the decode threads hold a few dozen crops ahead, not 400 (issue
    22.5: memory grew with the boxes of one image), and the image is still decoded once."""
    from featx.extract import decode as decode_module
    from featx.extract import rowgroup

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(jpeg(1, (200, 150)))
    boxes = [{"path": "a.jpg", "x1": i % 100, "y1": 0, "x2": i % 100 + 50, "y2": 50} for i in range(400)]
    config = ExtractConfig(**SETTINGS, rows_per_group=8, workers=2)
    job = plan_job([tmp_path / "in"], config, regions=pd.DataFrame(boxes))
    crops, opened = [], []
    real_crop, real_open = decode_module.crop_box, rowgroup.open_upright
    monkeypatch.setattr(decode_module, "crop_box", lambda *a: crops.append(1) or real_crop(*a))
    monkeypatch.setattr(rowgroup, "open_upright", lambda *a: opened.append(1) or real_open(*a))
    stream = LocalRun(job, store.SingleFile(tmp_path / "f.parquet")).decoded(job.items)
    seen = 0
    for _item, _decoded in stream:
        seen += 1
        time.sleep(0.001)  # a slow consumer: the threads may run ahead, within their window
        assert len(crops) - seen <= 32, (len(crops), seen)
    assert seen == len(crops) == 400 and len(opened) == 1


@posix_only
def test_the_evaluate_cache_fingerprints_a_folder_with_a_broken_link(tmp_path):
    """Discovery now lists a broken link (with its failure); the cache key of `featx probe` and
    `featx evaluate` takes it rather than failing on its stat."""
    from featx.evaluate.cache import fingerprint

    (tmp_path / "a.jpg").write_bytes(jpeg(1))
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    before = fingerprint(discover([tmp_path]))
    (tmp_path / "nowhere.jpg").write_bytes(jpeg(2))  # the link now points at an image
    assert fingerprint(discover([tmp_path])) != before


@posix_only
def test_a_link_beside_its_target_is_an_image_of_its_own(tmp_path):
    """Found while reworking the decode units: two paths of one file (a link and its target)
    were grouped as one image's regions, and both failed."""
    root = tmp_path / "in" / "cls"
    root.mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg(1))
    (root / "b.jpg").symlink_to(root / "a.jpg")
    out = tmp_path / "f.parquet"
    result = featx.extract_features(tmp_path / "in", out, **SETTINGS)
    assert (result.rows, result.failures) == (2, 0)
    df = featx.read_features(out).set_index("path")
    np.testing.assert_array_equal(df.loc["cls/a.jpg", "feature"], df.loc["cls/b.jpg", "feature"])


@posix_only
def test_regions_of_a_file_discovery_refused_carry_its_reason(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "good.jpg").write_bytes(jpeg(1, (120, 90)))
    os.mkfifo(root / "pipe.jpg")
    boxes = pd.DataFrame(
        [{"path": p, "x1": 0, "y1": 0, "x2": 20, "y2": 20, "region": r} for p in ("good.jpg", "pipe.jpg") for r in "ab"]
    )
    out = tmp_path / "f.parquet"
    result = run_in_thread(lambda: featx.extract_features(root, out, regions=boxes, **SETTINGS))
    assert (result.rows, result.failures) == (2, 2)
    errors = pq.read_table(store.errors_path(out)).to_pylist()
    assert [(e["path"], e["region"], e["error"]) for e in errors] == [
        ("pipe.jpg", "a", "NotAFile"),
        ("pipe.jpg", "b", "NotAFile"),
    ]
