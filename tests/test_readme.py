"""The README's "Use the features" examples are tested: every ```python block there runs."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

import featx
from tests.conftest import REPO

HEADING = "## Use the features"
# The settings the README says the suite uses for samples.parquet and for its VGGFeatures.
DEMO = dict(model="vgg11", weights="random", scales=(224,))


def python_blocks(text: str, heading: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block between `heading` and the next `## `."""
    start = text.index("\n" + heading + "\n") + 1
    end = text.find("\n## ", start + len(heading))
    section = text[start : end if end != -1 else len(text)]
    first_line = text[:start].count("\n") + 1
    return [
        (first_line + section[: m.start(1)].count("\n"), m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```$", section, re.S | re.M)
    ]


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


@pytest.mark.slow
def test_the_examples_run(tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO / "data" / "samples", tmp_path / "data" / "samples")
    monkeypatch.chdir(tmp_path)
    featx.extract_features("data/samples", "samples.parquet", **DEMO)
    namespace: dict = {"__name__": "readme"}
    for line, code in python_blocks((REPO / "README.md").read_text(), HEADING):
        # Padded so that a traceback points at the README's own line numbers.
        exec(compile("\n" * (line - 1) + code, str(REPO / "README.md"), "exec"), namespace)
    out = capsys.readouterr().out
    assert "crab/image_0001.jpg" in out and "anchor" in out
    assert namespace["X"].shape == (12, 4096) and namespace["X"].dtype == np.float32
    assert namespace["search"].best_params_["linearsvc__C"] in (0.1, 1.0)
    assert len(namespace["result"].predictions) == 3 * 4  # one test image per class per split
    hits = namespace["index"].neighbours(["data/samples/crab/image_0001.jpg"], k=3)
    assert hits["path"][0] == "crab/image_0001.jpg" and hits["score"][0] > 0.999
