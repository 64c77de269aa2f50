"""Fast start: `featx --help`, `featx <cmd> --help` and `featx info FILE` load no heavy library.

Each command runs in a fresh interpreter, which then reports the modules it imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from featx import store

HEAVY = ("torch", "torchvision", "sklearn", "ray", "scipy", "matplotlib", "faiss")

PROBE = """
import json, sys
{pre}
from featx.cli import app
try:
    app(sys.argv[1:])
except SystemExit:
    pass
heavy = {heavy}
loaded = sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy))
print(json.dumps(loaded), file=sys.stderr)
"""


def imported_by(*args: str, pre: str = "", heavy: tuple[str, ...] = HEAVY) -> list[str]:
    code = PROBE.replace("{heavy}", repr(set(heavy))).replace("{pre}", pre)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("info") / "f.parquet"
    prov = {"settings_hash": "0" * 16, "dim": 4, "model": "vgg16", "scales": [256]}
    schema = store.feature_schema(4, prov)
    rows = store.rows_table(
        schema, ["a/1.jpg", "b/2.jpg"], ["a", "b"], [10, 20], [10, 20], np.eye(2, 4, dtype=np.float32)
    )
    store.write_atomic(rows, out)
    return out


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["extract", "--help"],
        ["evaluate", "--help"],
        ["info", "--help"],
        ["probe", "--help"],
        ["index", "--help"],
        ["neighbours", "--help"],
        ["model", "--help"],
        ["--version"],
    ],
)
def test_help_imports_no_heavy_library(args):
    assert imported_by(*args) == []


def test_info_imports_no_heavy_library(feature_file):
    assert imported_by("info", str(feature_file)) == []


def test_the_probe_can_see_a_heavy_import():
    """The check can fail: a command that does load torch is reported."""
    assert "torch" in imported_by("--help", pre="import featx.extract.run")


def test_import_featx_is_light_and_names_resolve_lazily():
    code = (
        "import sys, featx; heavy = [m for m in sys.modules if m.split('.')[0] in {'torch','sklearn','pandas'}];"
        "assert not heavy, heavy; featx.ExtractConfig; assert 'torch' not in sys.modules;"
        "featx.extract_features; assert 'torch' in sys.modules; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.slow
def test_extract_imports_only_what_it_uses(tmp_path, samples):
    # pandas (0.2 s) came in through pyarrow's pandas shim (pa.array, pq.read_table) and
    # featx.store.read; torchvision (1.2 s: it loads torch._dynamo) through VGG's builder, the
    # resize and the provenance; none of these is needed to write a VGG feature file.
    out = tmp_path / "f.parquet"
    image = str(sorted(samples.rglob("*.jpg"))[0])
    args = ["extract", image, "-o", str(out), "--model", "vgg11", "--weights", "random", "--layer", "pool5"]
    unused = ("pandas", "pyarrow.dataset", "torchvision", "sklearn", "scipy", "matplotlib", "faiss", "ray", "rich")
    assert imported_by(*args, "--scales", "32", "--no-flip", "--quiet", heavy=unused) == []
    assert out.is_file()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet18", "convnext_tiny"])
def test_a_net_featx_builds_itself_runs_without_torchvision(tmp_path, samples, model):
    # featx.net.backbones.resnet and .convnext build torchvision's nets module for module.
    image = str(sorted(samples.rglob("*.jpg"))[0])
    out = tmp_path / "f.parquet"
    args = ["extract", image, "-o", str(out), "--model", model, "--weights", "random", "--scales", "32"]
    assert imported_by(*args, "--no-flip", "--quiet", heavy=("torchvision",)) == []
    assert out.is_file()


@pytest.mark.slow
def test_a_second_process_reuses_the_compiled_winograd_transforms(tmp_path, samples):
    """Start-up: the first run on a machine compiles the Winograd transforms into featx's cache
    folder; the next process loads them (compiler runs counted, not timed)."""
    import shutil

    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler here: featx runs the transforms by torch ops")
    calls = tmp_path / "cc-calls.txt"
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {compiler} "$@"\n')
    wrapper.chmod(0o755)
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "CC": str(wrapper)}
    image = str(sorted(samples.rglob("*.jpg"))[0])
    args = ["extract", image, "--model", "vgg11", "--weights", "random", "--layer", "pool5", "--scales", "32"]
    args += ["--no-flip", "--quiet", "--device", "cpu", "--overwrite"]
    counts = []
    for run in ("first", "second"):
        out = tmp_path / f"{run}.parquet"
        proc = subprocess.run(
            [sys.executable, "-m", "featx", *args, "-o", str(out)], capture_output=True, text=True, env=env, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts.append(len(calls.read_text().splitlines()) if calls.exists() else 0)
    assert counts[0] >= 1 and counts[1] == counts[0], counts
    assert list((tmp_path / "xdg" / "featx" / "kernels").glob("winograd-*.so"))
