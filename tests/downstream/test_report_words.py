"""What the probe's tables, plots and sheets say and how they are laid out (issue 22.18)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from featx.downstream.probe import probe
from featx.downstream.probe_report import print_report
from featx.downstream.sheet import sheet_figure
from tests.downstream.test_probe import clusters, feature_file


def printed(result) -> str:
    console = Console(record=True, width=200)
    print_report(result, console=console)
    return console.export_text()


def test_a_random_net_well_above_chance_is_not_called_near_chance(tmp_path):
    y, X = clusters(4, 10, spread=4.0)  # separable: far above the 25% of chance
    result = probe(feature_file(tmp_path / "f.parquet", y, X), splits=2)  # its weights: random
    assert result.report["metrics"]["mean_class_recall"]["mean"] > 70
    text = printed(result)
    assert "near chance" not in text
    assert "chance: 25.0% mean class recall (4 classes)" in text and "untrained net" in text


def test_classes_are_in_one_order_regardless_of_case(tmp_path):
    names = ["cherry", "Banana", "apple", "Date"]
    y, X = clusters(4, 6, spread=0.0, seed=3)  # inseparable: ties in the per-class table
    y = [names[int(label[-3:])] for label in y]
    result = probe(feature_file(tmp_path / "f.parquet", y, X), splits=1)
    expected = ["apple", "Banana", "cherry", "Date"]
    assert result.report["classes"] == expected
    assert result.report["confusion"]["classes"] == expected  # the matrix's rows and columns
    assert list(result.report["per_class"]) == expected
    rows = [line.split()[0] for line in printed(result).splitlines() if line.split()[:1] and line.split()[0] in names]
    tied = {}
    for c in rows:
        tied.setdefault(result.report["per_class"][c]["recall"], []).append(c)
    for group in tied.values():  # equal recall: listed by name, whatever the case
        assert group == sorted(group, key=str.casefold)


def _table(queries: int, k: int = 4) -> pd.DataFrame:
    rows = [
        {"query": f"cls/q{q}.jpg", "rank": r, "path": f"cls/p{r}.jpg", "label": "cls", "score": np.float32(0.9)}
        for q in range(queries)
        for r in range(1, k + 1)
    ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("queries", [1, 2, 11, 24])
def test_the_sheet_title_sits_just_above_the_first_captions(queries):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = sheet_figure(_table(queries))
    FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    title = fig.texts[0].get_window_extent(renderer)
    captions = max(ax.title.get_window_extent(renderer).y1 for ax in fig.axes)
    gap = (title.y0 - captions) / fig.dpi  # inches between the title and the first row's captions
    assert 0 < gap < 0.4, f"{queries} queries: {gap:.2f} in"
