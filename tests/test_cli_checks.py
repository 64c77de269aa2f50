"""Arguments are checked before torch loads, and outputs make their missing folders (issue 13.10).

Each bad command runs in a fresh interpreter, which then reports whether torch was imported:
a refusal that only needed the arguments must not wait for torch's seconds of start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fake_datasets import make_caltech

PROBE = """
import json, sys
from featx.cli import app
code = 0
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps([code, 'torch' in sys.modules]), file=sys.stderr)
"""


def refused(*args, cache) -> tuple[int, bool, str]:
    """(exit code, whether torch was imported, the error line) of `featx ARGS` in a fresh process."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}  # never the user's own cache
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=120, env=env
    )
    *lines, last = proc.stderr.strip().splitlines()
    code, torch = json.loads(last)
    return code, torch, "\n".join(lines)


@pytest.fixture(scope="module")
def caltech(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("args")
    make_caltech(tmp / "data" / "caltech101" / "101_ObjectCategories")
    (tmp / "a-file").write_text("")
    return tmp


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["evaluate", "--dataset", "caltech101", "--root", "{tmp}/nowhere", "--weights", "random"],
            "Caltech-101 not found",
        ),
        (
            ["evaluate", "--dataset", "caltech101", "--root", "{tmp}/data", "--report", "{tmp}/out/r.txt"],
            "must end in .json",
        ),
        (
            ["evaluate", "--dataset", "caltech101", "--root", "{tmp}/data", "--report", "{tmp}/a-file/r.json"],
            "is a file",
        ),
        (
            ["evaluate", "--dataset", "caltech101", "--root", "{tmp}/data", "--scales", "100"],
            "--scales 100 is below 224",
        ),
        (["evaluate", "--dataset", "caltech101", "--root", "{tmp}/data", "--cache-dir", "{tmp}/a-file"], "is a file"),
        (["evaluate", "--dataset", "caltech101", "--features", "{tmp}/none.parquet"], "no such file"),
        (
            ["evaluate", "--dataset", "caltech101", "--root", "{tmp}/data", "--weights", "random", "--model", "vgg11"],
            "fewer than n_train + 1 = 31 images",
        ),
        (["extract", "{tmp}/nowhere", "-o", "{tmp}/f.parquet"], "no such file or folder"),
        (["extract", "{tmp}/data", "-o", "{tmp}/f.parquet", "--scales", "100"], "--scales 100 is below 224"),
        (["extract", "{tmp}/data", "-o", "{tmp}/a-file/f.parquet"], "is a file"),
        (["extract", "{tmp}/data", "-o", "{tmp}/f.parquet", "--shard", "4/4"], "--shard"),
    ],
)
def test_a_bad_argument_is_refused_before_torch_loads(caltech, args, message):
    code, torch, error = refused(*(a.replace("{tmp}", str(caltech)) for a in args), cache=caltech / "xdg")
    errors = [line for line in error.splitlines() if line.startswith("featx: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], error
    assert not torch, f"torch was imported before refusing: {error}"


def test_the_probe_sees_torch_when_work_starts(caltech):
    """The check can fail: a command that gets as far as extracting does load torch."""
    code, torch, _ = refused(
        "extract", caltech / "data", "-o", caltech / "f.parquet", "--weights", "no-such.pth", cache=caltech / "xdg"
    )
    assert torch and code == 2


def test_outputs_make_their_missing_folders(samples, tmp_path):
    import featx

    out = tmp_path / "new" / "deeper" / "f.parquet"
    result = featx.extract_features(
        [samples / "anchor"], out, model="vgg11", weights="random", layer="pool5", scales=(32,), flip=False, workers=0
    )
    assert result.rows > 0 and out.is_file()
