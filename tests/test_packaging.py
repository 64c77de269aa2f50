"""What `pip install featx` ships: every package of the source tree, the pipelines as data."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_of_the_tree_is_listed_in_pyproject():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    in_tree = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "featx").rglob("__init__.py")}
    assert in_tree - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert listed - in_tree == {"featx.pipelines"}
    assert setuptools["package-dir"]["featx.pipelines"] == "pipelines"
    assert list((REPO / "pipelines").glob("*.toml")), "the paper's pipelines ship as featx.pipelines"
