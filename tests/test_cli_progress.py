"""Progress without a terminal (nohup, SLURM, CI logs): plain lines at a steady interval (issue 22.17)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

from featx.extract.progress import progress_bar, progress_lines
from tests.conftest import write_images


def test_plain_lines_come_at_a_steady_interval_and_at_the_end():
    stream = io.StringIO()
    with progress_lines(10, stream, interval=0.05) as advance:
        advance(3)
        time.sleep(1.0)  # many intervals, even on a loaded machine; no new image in between
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3, lines
    assert all(line.startswith("featx: extract 3/10 images, ") and "images/s" in line for line in lines)
    assert all(line.endswith(" left") for line in lines), lines  # a rate gives a time left


def test_the_last_line_says_all_done_without_a_time_left():
    stream = io.StringIO()
    with progress_lines(4, stream, interval=60) as advance:
        advance(4)
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("featx: extract 4/4 images, ") and line.endswith("images/s")


def test_a_stream_that_is_not_a_terminal_gets_lines_not_a_bar():
    stream = io.StringIO()  # isatty() is False, as for a log file
    with progress_bar(2, True, stream=stream, interval=60) as advance:
        advance(2)
    assert stream.getvalue().startswith("featx: extract 2/2 images")
    quiet = io.StringIO()
    with progress_bar(2, False, stream=quiet) as advance:
        advance(2)
    assert quiet.getvalue() == ""


def test_featx_extract_into_a_log_prints_plain_progress(tmp_path):
    write_images(tmp_path / "images", [(40, 36)] * 3, label="a")
    args = ["extract", str(tmp_path / "images"), "-o", str(tmp_path / "f.parquet"), "--model", "vgg11"]
    args += ["--weights", "random", "--layer", "pool5", "--scales", "32", "--no-flip"]
    with open(tmp_path / "log.txt", "w") as log:  # as `featx extract ... 2> log.txt` under nohup
        proc = subprocess.run([sys.executable, "-m", "featx", *args], stderr=log, stdout=subprocess.PIPE, timeout=300)
    text = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, text
    assert "featx: extract 3/3 images, " in text and "\x1b[" not in text  # no terminal escapes in a log
    assert os.path.getsize(tmp_path / "f.parquet") > 0
