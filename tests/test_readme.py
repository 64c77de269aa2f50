"""README.md runs as shown: step 1's smoke run, then every ```python block, in order (issue 22)."""

from __future__ import annotations

import re
import shlex
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import featx
from featx.cli import app
from tests.conftest import REPO

HEADING = "## Use the features"


def python_blocks(text: str, heading: str | None = None) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block, in the whole text or between `heading`
    and the next `## `."""
    start, end = 0, len(text)
    if heading is not None:
        start = text.index("\n" + heading + "\n") + 1
        found = text.find("\n## ", start + len(heading))
        end = found if found != -1 else len(text)
    section = text[start:end]
    first_line = text[:start].count("\n") + 1
    return [
        (first_line + section[: m.start(1)].count("\n"), m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```$", section, re.S | re.M)
    ]


def smoke_run(text: str) -> list[str]:
    """The arguments of step 1's offline smoke run: the `featx extract` line with a random net."""
    lines = [line for line in text.splitlines() if line.startswith("featx extract ") and "--weights random" in line]
    return shlex.split(lines[0].split("#")[0])[1:]


def test_the_section_has_the_examples():
    blocks = python_blocks((REPO / "README.md").read_text(), HEADING)
    code = "\n".join(c for _, c in blocks)
    assert len(blocks) >= 4
    for needle in (
        "load_xy",
        "LinearSVC",
        "VGGFeatures",
        "GridSearchCV",
        "duckdb",
        "list_dot_product",
        "polars",
        "featx.probe(",
        "featx.Index.build(",
        ".neighbours(",
    ):
        assert needle in code, needle
    # Honest about its demo net: every VGGFeatures there is the random one the text names.
    assert code.count("VGGFeatures(") == code.count('VGGFeatures(model="vgg11", weights="random", scales=(224,))')


def test_the_smoke_run_is_the_fast_one_into_step_1s_file():
    args = smoke_run((REPO / "README.md").read_text())
    assert args[:4] == ["extract", "data/samples", "-o", "samples.parquet"]
    # Seconds on a CPU: one small net at one scale, the settings the examples' text names.
    assert "--model" in args and args[args.index("--model") + 1] == "vgg11"
    assert "--scales" in args and args[args.index("--scales") + 1] == "224"


@pytest.mark.slow
def test_the_readme_runs_as_shown(tmp_path, monkeypatch, capsys):
    text = (REPO / "README.md").read_text()
    shutil.copytree(REPO / "data" / "samples", tmp_path / "data" / "samples")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, smoke_run(text))  # step 1, offline: samples.parquet
    assert result.exit_code == 0, result.output
    namespace: dict = {"__name__": "readme"}
    for line, code in python_blocks(text):  # every block, in the order a reader meets them
        # Padded so that a traceback points at the README's own line numbers.
        exec(compile("\n" * (line - 1) + code, str(REPO / "README.md"), "exec"), namespace)
    out = capsys.readouterr().out
    assert "crab/image_0001.jpg" in out and "anchor" in out
    assert namespace["X"].shape == (12, 4096) and namespace["X"].dtype == np.float32
    assert namespace["search"].best_params_["linearsvc__C"] in (0.1, 1.0)
    assert len(namespace["result"].predictions) == 3 * 4  # one test image per class per split
    hits = namespace["index"].neighbours(["data/samples/crab/image_0001.jpg"], k=3)
    assert hits["path"][0] == "crab/image_0001.jpg" and hits["score"][0] > 0.999
    assert featx.read_provenance("samples.parquet")["model"] == "vgg11"  # step 1's file, as the text says
