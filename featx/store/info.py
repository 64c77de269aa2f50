"""What `featx info` says about a feature file or folder: its facts, gathered, then as lines."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from featx.store.dataset_folder import WORK
from featx.store.output import LAST_RUN_KEY, STATE
from featx.store.read import feature_files, read_provenance
from featx.store.schema import errors_path
from featx.store.text import is_random, size_text, weights_text

# Shown after the weights of a random net, wherever it is seen: such features mean nothing.
RANDOM_WARNING = " — RANDOM WEIGHTS: for tests and smoke runs only, not for recognition"
SHOWN_LABELS = 12


def read_last_run(path: str | Path) -> dict | None:
    """What the last finished run did to a feature file or folder: added, replaced, dropped."""
    path = Path(path)
    if path.is_dir():
        state = path / WORK / STATE
        try:
            return json.loads(state.read_text()).get("last_run") if state.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None
    meta = pq.read_schema(path).metadata or {}
    try:
        run = json.loads(meta[LAST_RUN_KEY]) if LAST_RUN_KEY in meta else None
    except ValueError:
        return None
    return run if isinstance(run, dict) else None


@dataclass
class FeatureInfo:
    """The facts of a feature file or folder: rows, labels, failures, size, provenance, last run."""

    path: Path
    provenance: dict
    files: list[Path]  # the feature files (one for a file)
    rows: int
    labels: dict[str | None, int]  # rows per label; None: images given as files, not in a class folder
    error_files: list[Path]
    failures: int
    size: int  # bytes of the feature files
    last_run: dict | None
    unreadable: list[Path] = field(default_factory=list)  # error files that cannot be read

    def lines(self) -> list[str]:
        """The screen `featx info` prints: a headline, then one fact per line."""
        prov = self.provenance
        where = f" in {len(self.files)} files" if self.path.is_dir() else ""
        head = f"{self.path}: {_plural(self.rows, 'row')} × {prov.get('dim')} float32{where}, {size_text(self.size)}"
        # One fact per line, named as the options that set it, so two files can be compared by eye.
        return [head] + [f"  {name:<10} {value}" for name, value in self.facts()]

    def facts(self) -> list[tuple[str, str]]:
        prov = self.provenance
        norm, resize = prov.get("normalize", {}), prov.get("resize", {})
        scales = prov.get("scales", [])
        combined = ("stacked" if prov.get("aggregate") == "stack" else "averaged") if len(scales) > 1 else ""
        flip = "with its flipped image" if prov.get("flip") else "no flip"
        weights = weights_text(prov) + (RANDOM_WARNING if is_random(prov) else "")
        return [
            ("model", f"{prov.get('model')}, weights {weights}"),
            ("layer", f"{prov.get('layer')} map averaged over all positions, {flip}"),
            (
                "scales",
                f"Q = {', '.join(map(str, scales))}"
                + (f", {combined}" if combined else "")
                + ", L2-normalised"
                + (f"; longer side snapped to multiples of {prov['bucket']}" if prov.get("bucket") else ""),
            ),
            (
                "input",
                f"upright RGB, smaller side to Q ({resize.get('interpolation', '?')}"
                + (", antialiased" if resize.get("antialias") else "")
                + f"), mean {norm.get('mean')} std {norm.get('std')}",
            ),
            ("precision", f"{prov.get('precision')} on {prov.get('device')}"),
            ("settings", f"hash {prov.get('settings_hash')} (equal hash: same descriptor, comparable rows)"),
            (
                "software",
                f"featx {prov.get('featx_version')}, torch {prov.get('torch')}, torchvision {prov.get('torchvision')}",
            ),
            ("labels", self._labels_text()),
            ("failures", self._failures_text()),
            ("run", _last_run_text(self.last_run)),
        ]

    def _labels_text(self) -> str:
        named = sorted((c for c in self.labels.items() if c[0] is not None), key=lambda c: (-c[1], c[0]))
        unlabelled = self.labels.get(None, 0)
        text = ", ".join(f"{label} ({n})" for label, n in named[:SHOWN_LABELS])
        if len(named) > SHOWN_LABELS:
            text += f", and {len(named) - SHOWN_LABELS} more"
        if unlabelled:
            text += (
                ", and " if text else "none: "
            ) + f"{_plural(unlabelled, 'image')} given as files, not in a class folder"
        return f"{len(named)}: {text}" if named else text or "none"

    def _failures_text(self) -> str:
        damaged = "".join(
            f"; {e} is damaged: delete it (failures are tried again by every run)" for e in self.unreadable
        )
        readable = [e for e in self.error_files if e not in self.unreadable]
        if not self.failures:
            return ("none" if not damaged else "unknown") + damaged
        listed = ", ".join(str(e) for e in readable[:2])
        if len(readable) > 2:
            listed += f" and {len(readable) - 2} more"
        return f"{_plural(self.failures, 'image')}, listed in {listed}{damaged}"


def feature_info(path: str | Path) -> FeatureInfo:
    """Gather the facts of a feature file or folder (MissingData/BadInput if it is none)."""
    path = Path(path)
    prov = read_provenance(path)
    files = feature_files(path) if path.is_dir() else [path]
    labels = label_counts(files)
    # Beside each file (local engine) and beside the folder itself (--engine ray).
    error_files = sorted({e for e in map(errors_path, [*files, path]) if e.exists() and e not in files})
    failures = {e: _rows(e) for e in error_files}
    return FeatureInfo(
        path=path,
        provenance=prov,
        files=files,
        rows=sum(labels.values()),
        labels=labels,
        error_files=error_files,
        failures=sum(n for n in failures.values() if n is not None),
        size=sum(f.stat().st_size for f in files),
        last_run=read_last_run(path),
        unreadable=[e for e, n in failures.items() if n is None],
    )


def _rows(file: Path) -> int | None:
    """Rows of a Parquet file, or None if it cannot be read."""
    try:
        return pq.ParquetFile(file).metadata.num_rows
    except (pa.ArrowException, OSError):
        return None


def label_counts(files: list[Path]) -> dict[str | None, int]:
    """Rows per label over feature files, read one row group's labels at a time.

    A 1M-row file's labels are counted in the memory of one group's strings, and its feature
    column is never read.
    """
    counts: Counter = Counter()
    for f in files:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            for c in pf.read_row_group(g, columns=["label"]).column("label").value_counts().to_pylist():
                counts[c["values"]] += c["counts"]
    return dict(counts)


def _last_run_text(run: dict | None) -> str:
    if not run:
        return "not recorded"
    # A rerun that finds nothing to do leaves the output as it is, this record included.
    return (
        f"last changed by the run finished {run['finished']}: it added {run['added']}, replaced "
        f"{run['replaced']} (changed since), dropped {run['dropped']} (gone since)"
    )


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
