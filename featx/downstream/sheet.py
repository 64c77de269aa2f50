"""Contact sheets of `featx neighbours --sheet`: each query beside its nearest indexed images.

Drawn on a matplotlib Figure, never through pyplot, so a notebook's backend is left as it was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from featx.store.paths import check_output, make_parent

# Inches: one row of thumbnails with its two-line captions, and the band above them for the title.
ROW_HEIGHT, TITLE_BAND, TITLE_TOP = 2.25, 0.75, 0.12


def draw_sheet(
    table: pd.DataFrame, out: str | Path, *, images: str | Path | None = None, max_queries: int = 24, thumb: int = 160
) -> Path:
    """A PNG with each query beside its neighbours: thumbnails, rank, cosine and label.

    Query names that are image files are drawn from there; indexed rows (and queries taken
    from a feature file) are looked up under `images`, the folder they were extracted from.
    """
    out = make_parent(check_output(out, "--sheet", suffix=".png"), "--sheet")
    sheet_figure(table, images=images, max_queries=max_queries, thumb=thumb).savefig(out, dpi=100, bbox_inches="tight")
    return out


def sheet_figure(table: pd.DataFrame, *, images: str | Path | None = None, max_queries: int = 24, thumb: int = 160):
    """The contact sheet as a matplotlib Figure; the title keeps the same band above the first
    row's captions however many rows there are."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it is

    queries = list(dict.fromkeys(table["query"]))
    shown = queries[:max_queries]
    k = int(table["rank"].max()) if len(table) else 1
    root = Path(images).expanduser() if images is not None else None
    height = TITLE_BAND + ROW_HEIGHT * len(shown)
    fig = Figure(figsize=(1.9 * (k + 1), height))
    # Fractions of the figure from inches, so the band above the first row is the same for 1 or 24 rows.
    axes = fig.subplots(
        len(shown),
        k + 1,
        squeeze=False,
        gridspec_kw={"wspace": 0.06, "hspace": 0.42, "top": 1 - TITLE_BAND / height, "bottom": 0.05 / height},
    )
    for r, q in enumerate(shown):
        hits = table[table["query"] == q].sort_values("rank")
        _thumb(axes[r, 0], _find(q, root), thumb)
        axes[r, 0].set_title(_short("/".join(Path(q).parts[-2:]), 26), fontsize=8, fontweight="bold")
        for spine in axes[r, 0].spines.values():
            spine.set_visible(True)
            spine.set_color("#cc3311")
            spine.set_linewidth(2.5)
        for c in range(1, k + 1):
            ax = axes[r, c]
            row = hits[hits["rank"] == c]
            if row.empty:
                ax.axis("off")
                continue
            row = row.iloc[0]
            _thumb(ax, _find(row["path"], root), thumb)
            label = row["label"] if isinstance(row["label"], str) else ""
            ax.set_title(f"#{c}  {row['score']:.3f}\n{_short(label or row['path'], 22)}", fontsize=7.5)
    note = f" (first {len(shown)} of {len(queries)} queries)" if len(queries) > len(shown) else ""
    fig.suptitle(
        f"nearest neighbours by cosine: query (red) and its {k} nearest{note}",
        fontsize=10,
        y=1 - TITLE_TOP / height,
        va="top",
    )
    return fig


def _find(name: str, root: Path | None) -> Path | None:
    for candidate in ([root / name] if root is not None else []) + [Path(name)]:
        if candidate.is_file():
            return candidate
    return None


def _thumb(ax, file: Path | None, size: int) -> None:
    from PIL import Image, ImageOps

    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if file is None:
        ax.set_facecolor("#eeeeee")
        ax.text(
            0.5, 0.5, "image not found\n(pass --images DIR)", ha="center", va="center", fontsize=6.5, color="#555555"
        )
        return
    try:
        with Image.open(file) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((size, size))
            ax.imshow(np.asarray(img))
    except Exception:  # an unreadable file is drawn as missing, not a failed sheet
        ax.set_facecolor("#eeeeee")
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1) :]
