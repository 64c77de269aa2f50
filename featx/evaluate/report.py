"""The results of `featx evaluate`: a terminal table beside the paper's, JSON, and PNG plots.

Simonyan & Zisserman, arXiv 1409.1556, Table 11 is what the table sets featx's numbers
against: mean class recall (Caltech) or mAP (VOC), in percent.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table

from featx import __version__
from featx.evaluate.datasets import get_spec
from featx.evaluate.protocol import mean_std
from featx.store.atomic import write_json
from featx.store.paths import check_output, make_parent
from featx.store.text import weights_text

if TYPE_CHECKING:
    from featx.evaluate.pipeline import Pipeline


@dataclass
class Evaluation:
    """The report (JSON-ready dict, percent) and the curves the plots draw."""

    report: dict
    # Per result row label: test labels and scores of the first split (VOC PR curves).
    curves: dict = field(default_factory=dict)


def result_row(label: str, models: Sequence[str], records: list[dict], **more) -> dict:
    """One row of the report: nets, their value as mean ± std over the splits, and each split's record."""
    summary = mean_std([r.get("value") for r in records])
    return {"label": label, "models": list(models), **more, **summary, "splits": records}


def paper_block(pipeline: Pipeline) -> dict:
    """The paper's numbers the report sets featx's beside (Tables 11 and 12)."""
    settings = pipeline.kind == "voc_action"
    return {
        "source": pipeline.paper_source,
        "note": pipeline.paper_note,
        "results": [
            {
                "label": r.label,
                "models": list(r.models),
                **({"setting": r.setting} if settings else {}),
                "mean": r.mean,
                "std": r.std,
            }
            for r in pipeline.paper
        ],
    }


def config_block(
    pipeline: Pipeline,
    *,
    provenance: dict,
    features: list[dict],
    root: Path | None,
    image_dir: Path,
    n_images: int,
    notes: list[str],
    head_seconds: float,
    started: float,
    **more,
) -> dict:
    """How the numbers were made: the pipeline, the weights (from a feature file's `provenance`),
    each net's features, the data, notes, and the time spent (since `started`, a perf_counter)."""
    spec = get_spec(pipeline.dataset)
    return {
        "pipeline": pipeline.to_dict(),
        "weights": weights_text(provenance),
        "features": features,
        "root": str(Path(root).resolve()) if root is not None else None,
        "image_dir": str(image_dir),
        "n_images": n_images,
        **more,
        "notes": notes + ([spec.note] if spec.note else []),
        "featx_version": __version__,
        "head_seconds": round(head_seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def table(report: dict) -> Table:
    """featx's value beside the paper's for every net and the fusion, with the weights used."""
    spec = get_spec(report["dataset"])
    cfg = report["config"]
    metric = "mean class recall" if report["metric"] == "mean_class_recall" else "mAP"
    if report.get("ap"):
        metric += " (11-point AP)" if report["ap"] == "voc07_11point" else " (area AP)"
    n_splits = len(report["results"][0]["splits"]) if report["results"] else 0
    weights = cfg["weights"]
    t = Table(
        title=(
            f"{spec.title}: {metric}, %  ({len(report['classes'])} classes, {cfg['n_images']} "
            f"{'persons' if spec.kind == 'voc_action' else 'images'}, {n_splits} split{'s' if n_splits != 1 else ''})"
        ),
        title_justify="left",
    )
    t.add_column("nets")
    t.add_column("featx", justify="right")
    if report.get("ap"):
        t.add_column("other AP", justify="right")
    t.add_column("paper", justify="right")
    t.add_column("C per split", justify="right")
    t.add_column("train / test", justify="right")
    paper = {(tuple(r["models"]), r.get("setting")): r for r in report["paper"]["results"]}
    for r in report["results"]:
        ref = paper.get((tuple(r["models"]), r.get("setting")))
        nets = " + ".join(r["models"])
        name = nets if r["label"] in (nets, " & ".join(r["models"])) else f"{r['label']} ({nets})"
        if r.get("setting"):
            name = r["label"]
        row = [name, _pm(r["mean"], r["std"])]
        if report.get("ap") and r["mean"] is None:  # --test-server: scored by the server
            row.append("-")
        elif report.get("ap"):
            key = "area_mAP" if report["ap"] == "voc07_11point" else "voc07_mAP"
            other = [s[key] for s in r["splits"]]
            row.append(f"{np.mean(other):.1f} ({'area' if key == 'area_mAP' else '11-pt'})")
        row.append(_pm(ref["mean"], ref["std"]) if ref else "-")
        row.append(", ".join(f"{s['C']:g}" for s in r["splits"]))
        s0 = r["splits"][0]
        row.append(f"{s0['n_train']} / {s0['n_test']}")
        t.add_row(*row)
    captions = [f"weights: {weights}"]
    if weights.startswith("random"):
        captions[0] += " — far below the paper by design: a smoke test, not a result"
    computed = sorted({f"{f['precision']} on {f['device']}" for f in cfg.get("features", []) if f.get("precision")})
    if computed:
        asked = cfg.get("precision")
        captions.append(
            f"precision: {', '.join(computed)}" + (f" (--precision {asked})" if asked else " (as in the feature files)")
        )
    captions += cfg.get("notes", [])
    if report["paper"].get("note"):
        captions.append(report["paper"]["note"])
    if captions:
        t.caption = "\n".join(f"• {c}" for c in captions)
        t.caption_justify = "left"
    return t


def print_table(report: dict, console: Console | None = None) -> None:
    """Print the result table (to stdout unless a console is given)."""
    (console or Console()).print(table(report))


def check_report_path(path: str | Path) -> Path:
    """Refuse a --report path that cannot be written, before any work is done."""
    return check_output(path, "--report", suffix=".json")


def write_report(evaluation: Evaluation, path: str | Path) -> list[Path]:
    """Write the JSON report to `path` and its PNG plots beside it; return all files written."""
    path = make_parent(check_report_path(path), "--report")
    report = evaluation.report
    write_json(report, path, indent=2, sort_keys=False)
    written = [path]
    for r in report["results"]:
        stem = f"{path.stem}-{_slug(r['label'])}"
        if r["mean"] is None:  # --test-server: no labels, nothing to plot
            continue
        if report["metric"] == "mean_class_recall":
            written.append(_plot_recall(report, r, path.with_name(f"{stem}-recall.png")))
        else:
            written.append(_plot_ap(report, r, path.with_name(f"{stem}-ap.png")))
            curve = evaluation.curves.get(r["label"])
            if curve is not None:
                written.append(_plot_pr(report, r, curve, path.with_name(f"{stem}-pr.png")))
    return written


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _plot_recall(report: dict, r: dict, out: Path) -> Path:
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it is

    classes = report["classes"]
    per_split = [[s["per_class"].get(c, np.nan) for c in classes] for s in r["splits"]]
    mean = np.array([_mean(column) for column in zip(*per_split)])
    order = np.argsort(-mean, kind="stable")
    height = max(3.0, 0.16 * len(classes) + 1.2)
    fig = Figure(figsize=(7.5, height))
    ax = fig.subplots()
    ax.barh(np.arange(len(classes)), mean[order], color="#4477aa")
    ax.set_yticks(np.arange(len(classes)), [classes[i] for i in order], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.axvline(r["mean"], color="#cc3311", lw=1, label=f"mean class recall {r['mean']:.1f}%")
    ax.set_xlabel(f"recall per class, %, mean over {len(r['splits'])} split(s)")
    ax.set_title(f"{get_spec(report['dataset']).title}, {r['label']} — {report['config']['weights']}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.margins(y=0.005)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def _plot_ap(report: dict, r: dict, out: Path) -> Path:
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it is

    classes = report["classes"]

    def values(key):
        return np.array([_mean([s["per_class"][c][key] for s in r["splits"]]) for c in classes])

    ap07, area = values("voc07_ap"), values("area_ap")
    x = np.arange(len(classes))
    fig = Figure(figsize=(10, 4.2))
    ax = fig.subplots()
    ax.bar(x - 0.2, ap07, 0.4, label=f"11-point AP (mean {_mean(ap07):.1f})", color="#4477aa")
    ax.bar(x + 0.2, area, 0.4, label=f"area AP (mean {_mean(area):.1f})", color="#66ccee")
    ax.set_xticks(x, classes, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 118)  # headroom above 100 for the legend, clear of every bar
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("AP, %")
    ax.set_title(
        f"{get_spec(report['dataset']).title}, {r['label']}: AP per class — {report['config']['weights']}", fontsize=9
    )
    ax.legend(fontsize=8, loc="upper left", ncols=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def _plot_pr(report: dict, r: dict, curve: dict, out: Path) -> Path:
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it is

    classes = report["classes"]
    cols = 5
    rows = int(np.ceil(len(classes) / cols))
    fig = Figure(figsize=(12, 2.4 * rows))
    axes = fig.subplots(rows, cols, sharex=True, sharey=True)
    per_class = r["splits"][0]["per_class"]
    for ax, c in zip(np.ravel(axes), classes):
        precision, recall = curve[c]
        # A step plot: precision holds between hits, so no line is drawn from (0, 0).
        ax.step(recall, precision, where="post", color="#4477aa", lw=1.2, label="measured")
        # The devkit scores the interpolated curve: best precision at this recall or beyond.
        interpolated = np.maximum.accumulate(precision[::-1])[::-1]
        ax.step(recall, interpolated, where="post", color="#cc3311", lw=0.9, ls="--", label="interpolated (AP)")
        ap = per_class[c]["area_ap"]
        ax.set_title(f"{c}  area AP {ap:.1f}" if ap is not None else f"{c}  (no positive)", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in np.ravel(axes)[len(classes) :]:
        ax.axis("off")
    handles, labels = np.ravel(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower right", ncols=2, frameon=False)
    fig.supxlabel("recall")
    fig.supylabel("precision")
    fig.suptitle(
        f"{get_spec(report['dataset']).title}, {r['label']}: precision/recall on the test set "
        f"(split seed {r['splits'][0]['seed']}) — {report['config']['weights']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def _mean(values) -> float:
    """Mean of the defined values (None/NaN mark AP of a class without positives); NaN if none."""
    kept = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(kept)) if kept else float("nan")
