"""The results of `featx probe` for people and files: terminal tables, JSON, predictions, PNG plots.

The plots are drawn on matplotlib Figures, never through pyplot, so a notebook's backend is
left as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from featx import store
from featx.downstream.labelled import class_key
from featx.downstream.probe import ProbeResult
from featx.store.atomic import write_json
from featx.store.paths import check_output, make_parent

METRIC_NAMES = {
    "accuracy": "accuracy",
    "mean_class_recall": "mean class recall",
    "top5_accuracy": "top-5 accuracy",
    "mAP": "mAP (area AP)",
}


def print_report(result: ProbeResult, console=None, max_classes: int = 30) -> None:
    """The summary and per-class tables, and the errors table when images failed."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    r = result.report
    proto = r["protocol"]
    how = (
        f"{proto['train_per_class']} training images per class"
        if proto["train_per_class"]
        else f"{100 * proto['test_size']:.0f}% of each class tested"
    )
    t = Table(
        title=f"probe: {len(r['classes'])} classes, {r['n_images']} images, {proto['splits']} "
        f"split{'s' if proto['splits'] != 1 else ''} ({how}), {proto['head']} head",
        title_justify="left",
    )
    t.add_column("metric")
    t.add_column("%", justify="right")
    t.add_column("per split", justify="right")
    for m, v in r["metrics"].items():
        t.add_row(METRIC_NAMES[m], _pm(v), ", ".join(_f(s[m]) for s in r["splits"]))
    captions = [f"features: {r['features']['descriptor']}; weights {r['features']['weights']}"]
    if str(r["features"]["weights"]).startswith("random"):
        captions[0] += " (an untrained net: for tests and smoke runs, not a measure of transfer)"
    if r["task"] == "single-label":
        n = len(r["classes"])
        captions.append(f"chance: {100 / n:.1f}% mean class recall ({n} classes)")
    captions.append("C per split: " + ", ".join(f"{s['C']:g}" for s in r["splits"]))
    captions += r["notes"]
    t.caption = "\n".join(f"• {c}" for c in captions)
    t.caption_justify = "left"
    console.print(t)

    pc = Table(title="per class (mean over splits)", title_justify="left")
    pc.add_column("class")
    keys = ["ap"] if r["task"] == "multi-label" else ["recall", "precision"]
    for k in keys:
        pc.add_column(k if k != "ap" else "AP", justify="right")
    pc.add_column("tested", justify="right")
    items = sorted(r["per_class"].items(), key=lambda kv: (_sortable(kv[1][keys[0]]), class_key(kv[0])))
    if len(items) > max_classes:
        half = max_classes // 2
        items = [*items[:half], None, *items[-half:]]
    for item in items:
        if item is None:
            pc.add_row("…", *[""] * (len(keys) + 1))
            continue
        c, v = item
        pc.add_row(c, *[_f(v[k]) for k in keys], str(v["n_test"]))
    console.print(pc)
    if r["errors"]:
        et = Table(title=f"{len(r['errors'])} images or folders left out", title_justify="left")
        for col in ("path", "stage", "error", "message"):
            et.add_column(col)
        for e in r["errors"][:20]:
            et.add_row(*(str(e.get(col, "")) for col in ("path", "stage", "error", "message")))
        console.print(et)


def _pm(v: dict) -> str:
    if v["mean"] is None:
        return "-"
    return f"{v['mean']:.1f} ± {v['std']:.1f}" if v["std"] is not None else f"{v['mean']:.1f}"


def _f(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _sortable(x) -> float:
    return -1.0 if x is None else float(x)


def write_predictions(result: ProbeResult, path: str | Path) -> Path:
    """One row per test image per split: path, split, label, predicted, score (and top5)."""
    path = make_parent(check_output(path, "--predictions", suffix=".parquet"), "--predictions")
    table = pa.Table.from_pandas(result.predictions, preserve_index=False)
    meta = {b"featx_probe": json.dumps({"classes": result.report["classes"], "task": result.report["task"]})}
    store.write_atomic(table.replace_schema_metadata({**(table.schema.metadata or {}), **meta}), path)
    return path


def write_report(result: ProbeResult, path: str | Path) -> list[Path]:
    """The JSON report, and beside it the confusion matrix and the per-class bars as PNG."""
    path = make_parent(check_output(path, "--report", suffix=".json"), "--report")
    write_json(result.report, path, indent=2, sort_keys=False)
    written = [path]
    if result.confusion is not None:
        written.append(plot_confusion(result, path.with_name(f"{path.stem}-confusion.png")))
    written.append(plot_per_class(result, path.with_name(f"{path.stem}-per-class.png")))
    return written


def plot_confusion(result: ProbeResult, out: Path) -> Path:
    """The confusion matrix summed over splits, each true class's row normalised to 100%."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it is

    classes = result.report["classes"]
    counts = result.confusion.astype(np.float64)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    # Cells and names grow with the class count so that ~100 names stay legible (>= 6 pt).
    side = min(max(5.0, 0.17 * n + 2.5), 22.0)
    font = 8 if n <= 30 else 6.5 if n <= 70 else 6
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    im = ax.imshow(100 * rows, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    ax.set_xticks(np.arange(n), classes, rotation=90, fontsize=font)
    ax.set_yticks(np.arange(n), classes, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{100 * rows[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "black",
                    )
    r = result.report
    acc = r["metrics"]["accuracy"]["mean"]
    ax.set_title(
        f"confusion, % of each true class, summed over {len(r['splits'])} split(s)\n"
        f"accuracy {acc:.1f}% — weights {r['features']['weights']}",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, shrink=0.4, label="% of the true class")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def plot_per_class(result: ProbeResult, out: Path) -> Path:
    """Recall and precision (or AP) per class, mean over splits, worst first."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it is

    r = result.report
    keys = ["ap"] if r["task"] == "multi-label" else ["recall", "precision"]
    classes = sorted(r["classes"], key=lambda c: (_sortable(r["per_class"][c][keys[0]]), class_key(c)))
    n = len(classes)
    fig = Figure(figsize=(7.5, max(3.0, 0.2 * n * len(keys) / 1.5 + 1.4)))
    ax = fig.subplots()
    y = np.arange(n)
    h = 0.8 / len(keys)
    colors = {"recall": "#4477aa", "precision": "#66ccee", "ap": "#4477aa"}
    for i, k in enumerate(keys):
        vals = [r["per_class"][c][k] for c in classes]
        ax.barh(
            y + (i - (len(keys) - 1) / 2) * h,
            [np.nan if v is None else v for v in vals],
            h,
            color=colors[k],
            label=k if k != "ap" else "AP",
        )
    ax.set_yticks(y, classes, fontsize=8 if n <= 40 else 6)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("%, mean over splits")
    main = "mAP" if r["task"] == "multi-label" else "mean_class_recall"
    ax.axvline(
        r["metrics"][main]["mean"] or 0,
        color="#cc3311",
        lw=1,
        label=f"{METRIC_NAMES[main]} {r['metrics'][main]['mean'] or 0:.1f}%",
    )
    # Above the axes: bars reach 100, so a legend inside would hide some.
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, fontsize=8, frameon=False)
    fig.suptitle(f"per class — weights {r['features']['weights']}", fontsize=9)
    ax.margins(y=0.01)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out
