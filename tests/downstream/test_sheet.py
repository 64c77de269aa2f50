"""Contact sheets: each query beside its neighbours, drawn without touching the caller's backend."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featx.downstream.sheet import draw_sheet
from featx.errors import BadInput


def test_a_sheet_draws_queries_and_neighbours_and_leaves_the_backend(tmp_path, other_backend):
    import matplotlib

    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(images / "a" / f"{i}.jpg")
    table = pd.DataFrame(
        {
            "query": ["a/0.jpg"] * 2 + ["a/1.jpg"] * 2,
            "rank": [1, 2, 1, 2],
            "path": ["a/0.jpg", "a/2.jpg", "a/1.jpg", "gone.jpg"],
            "label": ["a", "a", "a", None],
            "score": np.array([1.0, 0.5, 1.0, 0.2], np.float32),
        }
    )
    out = draw_sheet(table, tmp_path / "new" / "sheet.png", images=images)  # its folder is made
    with Image.open(out) as sheet:
        assert sheet.width > 3 * 150 and sheet.height > 2 * 150
    assert matplotlib.get_backend() == other_backend
    with pytest.raises(BadInput, match="must end in .png"):
        draw_sheet(table, tmp_path / "sheet.jpg", images=images)
