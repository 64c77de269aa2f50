"""PASCAL VOC 2012 action classification: person instances, two settings, devkit AP and files.

Simonyan & Zisserman, arXiv 1409.1556, Appendix B and Table 12: Net-D & Net-E descriptors of
(i) the whole image holding the person ("image") and (ii) that stacked with the descriptor of
the person's box ("image and box"); one linear SVM per action; mean AP over the ten actions.

The devkit lists persons in `ImageSets/Action/<action>_<set>.txt` as `<image id> <object
index> <label>` (1 / -1; 0 is ignored); the object index is 1-based among all `<object>`
elements of `Annotations/<id>.xml`, whose `<bndbox>` is 1-based and inclusive.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx import store
from featx.errors import BadInput, MissingData
from featx.evaluate.cache import cached_features
from featx.evaluate.datasets import (
    ACTIONS,
    DatasetSpec,
    action_shortfall,
    ensure_dataset,
    find_images,
    get_spec,
    where_to_put,
)
from featx.evaluate.pipeline import Pipeline
from featx.evaluate.protocol import ap_record, draw_splits, fuse, pr_curves, run_protocol
from featx.evaluate.report import Evaluation, config_block, paper_block, result_row
from featx.extract.config import ExtractConfig
from featx.store.atomic import make_dir, write_text

SETTINGS = {"image": "image", "image_box": "image and box"}
# The devkit's competition number for action classification with any training data.
COMP = "comp10"


@dataclass(frozen=True, eq=False)
class ActionSet:
    """The person instances of one image set, in devkit order (sorted by image id, object index)."""

    name: str
    ids: tuple[str, ...]  # image id per instance
    objects: tuple[int, ...]  # 1-based object index per instance
    boxes: np.ndarray  # [n, 4] int: x1, y1, x2, y2, 0-based, x2/y2 exclusive (region convention)
    # [n, 10] in {1, -1, 0}; 0 also where an action's file does not list the instance.
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def voc_box(
    xmin: float, ymin: float, xmax: float, ymax: float, width: int | None, height: int | None
) -> tuple[int, ...]:
    """A 1-based inclusive VOC box as (x1, y1, x2, y2), 0-based with x2/y2 exclusive, in the image.

    Pixel xmin..xmax (1-based, both included) is 0-based xmin-1 .. xmax-1, so x2 = xmax.
    """
    x1, y1, x2, y2 = round(xmin) - 1, round(ymin) - 1, round(xmax), round(ymax)
    if width:
        x1, x2 = max(0, min(x1, width - 1)), max(1, min(x2, width))
    if height:
        y1, y2 = max(0, min(y1, height - 1)), max(1, min(y2, height))
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


def read_objects(xml_file: Path) -> tuple[list[tuple[int, ...]], tuple[int | None, int | None]]:
    """The boxes of every `<object>` of an annotation, in document order, and the image size.

    Parsed by tag name, never by child position (files differ in the order of their elements).
    """
    try:
        root = ET.parse(xml_file).getroot()
    except (OSError, ET.ParseError) as e:
        raise BadInput(f"{xml_file} is not a readable VOC annotation ({e}); unpack the archive again") from None

    def number(node, tag):
        child = node.find(tag) if node is not None else None
        try:
            return float(child.text)
        except (AttributeError, TypeError, ValueError):
            return None

    size = root.find("size")
    w, h = number(size, "width"), number(size, "height")
    width, height = (int(w) if w else None), (int(h) if h else None)
    boxes = []
    for k, obj in enumerate(root.findall("object"), 1):
        bb = obj.find("bndbox")
        values = [number(bb, t) for t in ("xmin", "ymin", "xmax", "ymax")]
        if None in values:
            raise BadInput(f"{xml_file}: object {k} has no complete <bndbox>; unpack the archive again")
        boxes.append(voc_box(*values, width, height))
    return boxes, (width, height)


def read_action_file(path: Path) -> dict[tuple[str, int], int]:
    """(image id, object index) -> label of one `<action>_<set>.txt` (split on whitespace)."""
    labels = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or parts[2] not in ("1", "-1", "0") or not parts[1].isdigit():
            raise BadInput(
                f"{path}:{n}: expected '<image id> <object index> <1|-1|0>', got {line!r}; "
                "the file is damaged: unpack the VOC archive again"
            )
        labels[(parts[0], int(parts[1]))] = int(parts[2])
    return labels


def load_action_set(year: Path, name: str) -> ActionSet:
    """The persons of image set `name` with their boxes and labels; each action's own file counts."""
    folder = year / "ImageSets" / "Action"
    per_action = []
    for action in ACTIONS:
        f = folder / f"{action}_{name}.txt"
        if not f.is_file():
            raise MissingData(f"{f} is missing: the VOC2012 action {name} set is incomplete; unpack the archive again")
        per_action.append(read_action_file(f))
    keys = sorted(set().union(*per_action))
    return _instances(year, name, keys, np.array([[a.get(k, 0) for a in per_action] for k in keys], np.int8))


def load_test_persons(year: Path) -> ActionSet:
    """The persons of the test set (labels unknown: 0): `ImageSets/Action/test.txt`."""
    f = year / "ImageSets" / "Action" / "test.txt"
    if not f.is_file():
        raise MissingData(
            f"{f} is missing: --test-server needs the VOC2012 test archive (VOC2012test.tar, from the "
            "evaluation server) unpacked under --root"
        )
    keys = set()
    for line in f.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            keys.add((parts[0], int(parts[1])))
        elif parts:  # an image id alone: every object of the image that has <actions>
            keys.update((parts[0], k) for k in _person_objects(year / "Annotations" / f"{parts[0]}.xml"))
    keys = sorted(keys)
    return _instances(year, "test", keys, np.zeros((len(keys), len(ACTIONS)), np.int8))


def _person_objects(xml_file: Path) -> list[int]:
    root = ET.parse(xml_file).getroot()
    return [k for k, obj in enumerate(root.findall("object"), 1) if obj.find("actions") is not None]


def _instances(year: Path, name: str, keys: list[tuple[str, int]], labels: np.ndarray) -> ActionSet:
    boxes = []
    cache: dict[str, list] = {}
    for image_id, k in keys:
        if image_id not in cache:
            xml = year / "Annotations" / f"{image_id}.xml"
            if not xml.is_file():
                raise MissingData(f"{xml} is missing (listed in the action {name} set); unpack the archive again")
            cache[image_id] = read_objects(xml)[0]
        objects = cache[image_id]
        if not 1 <= k <= len(objects):
            raise BadInput(
                f"ImageSets/Action lists object {k} of {image_id}, whose annotation has {len(objects)} "
                "objects; the copy mixes versions: unpack the archive again"
            )
        boxes.append(objects[k - 1])
    return ActionSet(
        name, tuple(i for i, _ in keys), tuple(k for _, k in keys), np.array(boxes, np.int64).reshape(-1, 4), labels
    )


# -- features ----------------------------------------------------------------------------


def region_table(sets: Sequence[ActionSet], margin: float = 0.0, sizes: dict[str, tuple] | None = None):
    """The persons' boxes as a regions table (path = `<id>.jpg`, region = object index)."""
    import pyarrow as pa

    rows = {"path": [], "region": [], "x1": [], "y1": [], "x2": [], "y2": []}
    for s in sets:
        for image_id, k, box in zip(s.ids, s.objects, s.boxes):
            x1, y1, x2, y2 = (int(v) for v in box)
            if margin:
                dx, dy = round(margin * (x2 - x1)), round(margin * (y2 - y1))
                w, h = (sizes or {}).get(image_id, (None, None))
                x1, y1 = max(0, x1 - dx), max(0, y1 - dy)
                x2, y2 = (x2 + dx if w is None else min(w, x2 + dx)), (y2 + dy if h is None else min(h, y2 + dy))
            for c, v in zip(rows, (f"{image_id}.jpg", str(k), x1, y1, x2, y2)):
                rows[c].append(v)
    return pa.table(rows)


def _features(path: Path, keys: list[tuple]) -> np.ndarray:
    """Rows of a feature file in the order of `keys` ((path,) or (path, region)); NaN if absent."""
    columns = ["path", "region", "feature"] if len(keys[0]) == 2 else ["path", "feature"]
    table = store.read_table(path, columns)
    X = store.feature_matrix(table.column("feature"))
    found = {k if len(keys[0]) == 2 else (k[0],): i for i, k in enumerate(store.row_keys(table))}
    out = np.full((len(keys), X.shape[1]), np.nan, np.float32)
    idx = np.array([found.get(k, -1) for k in keys])
    out[idx >= 0] = X[idx[idx >= 0]]
    return out


# -- the experiment ----------------------------------------------------------------------


@dataclass
class _Net:
    """One net's descriptors per action set: [image, box] rows in the set's order (NaN: none)."""

    model: str
    blocks: dict[str, list[np.ndarray]]
    record: dict  # what the report says of its features
    provenance: dict


def evaluate_action(
    pipeline: Pipeline,
    config: ExtractConfig | None = None,
    *,
    root: str | Path,
    download: bool = False,
    cache_dir: str | Path | None = None,
    jobs: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    results_dir: str | Path | None = None,
    test_server: bool = False,
):
    """VOC2012 action classification (Table 12): both settings, every net and their fusion.

    `config` carries how features are computed besides the pipeline's descriptor (device,
    precision, batch size, workers); image and box features go through the feature cache.
    """
    log = log or (lambda message: None)
    config = config if config is not None else ExtractConfig()
    spec = get_spec(pipeline.dataset)
    started = time.perf_counter()
    root = Path(root).expanduser()
    year, notes = _find_year(spec, root, download=download, progress=progress, log=log)
    train, test = load_action_set(year, spec.train_set), load_action_set(year, spec.test_set)
    if test_server:
        # As the paper did: train on trainval, score the test persons for the evaluation server.
        train = _join(train, test, "trainval")
        test = load_test_persons(year)
    sets = (train, test)
    inputs = _images(spec, root, year, sets)
    regions = region_table(sets, pipeline.protocol.box_margin)
    # torch loads once the data checks passed
    nets = [
        _net_features(pipeline, model, config, inputs, regions, sets, cache_dir, progress=progress, log=log)
        for model in pipeline.features.models
    ]
    keep = _described(nets, sets, notes)

    t_heads = time.perf_counter()
    results, curves, scores = _fit_settings(pipeline, nets, train, test, keep, jobs, scored=not test_server)
    head_seconds = time.perf_counter() - t_heads

    written = []
    if results_dir is not None:
        for setting in SETTINGS:
            written += write_results(Path(results_dir) / setting, test, keep[test.name], scores[setting])
    n_instances = sum(int(keep[s.name].sum()) for s in sets)
    extract_seconds = sum(n.record["extract_seconds"] for n in nets)
    config_record = config_block(
        pipeline,
        provenance=nets[0].provenance,
        features=[n.record for n in nets],
        root=root,
        image_dir=year / "JPEGImages",
        n_images=n_instances,
        n_persons={s.name: int(keep[s.name].sum()) for s in sets},
        results_files=[str(p) for p in written],
        extract_seconds_per_person=round(extract_seconds / max(n_instances, 1), 4),
        notes=notes,
        head_seconds=head_seconds,
        started=started,
    )
    return Evaluation(_report(pipeline, results, config_record, test_server), curves)


def _report(pipeline: Pipeline, results: list[dict], config_record: dict, test_server: bool) -> dict:
    """The report: Table 12's two settings at a glance, every row of nets, how it was made."""
    final = pipeline.rows()[-1]
    return {
        "dataset": pipeline.dataset,
        "metric": "mAP",
        # Table 12 at a glance: each setting's mAP and per-action AP for the last row (D & E).
        "settings": {
            r["setting"]: {
                "label": r["label"],
                "mAP": r["mean"],
                "per_action": {a: v["area_ap"] for a, v in r["splits"][0].get("per_class", {}).items()},
            }
            for r in results
            if tuple(r["models"]) == final
        },
        "ap": "area",
        "classes": list(ACTIONS),
        "results": results,
        "test_server": test_server,
        "paper": paper_block(pipeline),
        "config": config_record,
    }


def _find_year(spec: DatasetSpec, root: Path, *, download: bool, progress: bool, log) -> tuple[Path, list[str]]:
    """The devkit year folder under `root` (fetched if asked), and what the copy lacks."""
    if download:
        ensure_dataset(spec, root, progress=progress)
    year = find_images(spec, root)
    if year is None or not (year / "ImageSets" / "Action").is_dir():
        raise MissingData(
            f"{spec.title} not found under {root}: expected {root / spec.images}/ImageSets/Action; "
            + where_to_put(spec, root)
        )
    notes = []
    short = action_shortfall(spec, year)
    if short:
        notes.append(
            f"{spec.title} at {year} is incomplete ({', '.join(short)}): results are not comparable to the paper"
        )
        log(f"warning: {notes[-1]}")
    return year, notes


def _images(spec: DatasetSpec, root: Path, year: Path, sets: Sequence[ActionSet]) -> list[Path]:
    """The image files the persons of `sets` stand in, each once, sorted; all must be there."""
    jpegs = year / "JPEGImages"
    image_ids = sorted({i for s in sets for i in s.ids})
    missing = [i for i in image_ids if not (jpegs / f"{i}.jpg").is_file()]
    if missing:
        raise MissingData(
            f"{len(missing)} images of the action sets are missing from {jpegs} (first: {missing[0]}.jpg); "
            + where_to_put(spec, root)
        )
    return [jpegs / f"{i}.jpg" for i in image_ids]


def _net_features(pipeline, model, base, inputs, regions, sets, cache_dir, *, progress, log) -> _Net:
    """One net's image and box descriptors of every person, through the feature cache."""
    config = pipeline.features.config(model, base)
    name = pipeline.dataset
    image = cached_features(inputs, config, name=name, cache_dir=cache_dir, progress=progress, log=log)
    box = cached_features(inputs, config, name=name, cache_dir=cache_dir, progress=progress, log=log, regions=regions)
    blocks = {
        s.name: [
            _features(image.file, [(f"{i}.jpg",) for i in s.ids]),
            _features(box.file, [(f"{i}.jpg", str(k)) for i, k in zip(s.ids, s.objects)]),
        ]
        for s in sets
    }
    prov = store.read_provenance(image.file)
    record = {
        "model": model,
        "files": [str(image.file), str(box.file)],
        "settings_hash": prov.get("settings_hash"),
        "extract_seconds": round(image.seconds + box.seconds, 3),
        "new_rows": image.new_rows + box.new_rows,
    }
    return _Net(model, blocks, record, prov)


def _described(nets: list[_Net], sets: Sequence[ActionSet], notes: list[str]) -> dict[str, np.ndarray]:
    """Per set, the persons every net described (image and box); the others are left out, with a note."""
    keep = {s.name: np.ones(len(s), bool) for s in sets}
    for net in nets:
        for s in sets:
            for B in net.blocks[s.name]:
                keep[s.name] &= ~np.isnan(B[:, 0])
    for s in sets:
        if not keep[s.name].all():
            notes.append(
                f"{int((~keep[s.name]).sum())} {s.name} persons have no features (their image failed) and are left out"
            )
    return keep


def _fit_settings(pipeline, nets, train, test, keep, jobs, *, scored: bool):
    """Every row of nets in both settings through the protocol: the report's rows, the PR curves
    per row, and the last row's test scores per setting (the devkit's result files)."""
    by_model = {n.model: n for n in nets}
    p, norm = pipeline.protocol, pipeline.protocol.stack_norm
    Y = np.vstack([train.labels[keep[train.name]], test.labels[keep[test.name]]])
    n_train = int(keep[train.name].sum())
    splits = draw_splits(p, Y, fixed=(np.arange(n_train), np.arange(n_train, len(Y))))
    results, curves, last = [], {}, {}
    for models in pipeline.rows():
        for setting, setting_name in SETTINGS.items():
            parts = (0,) if setting == "image" else (0, 1)
            # Per net, its image (and box) descriptor; then the nets side by side; train rows, then test.
            X = np.vstack(
                [
                    fuse([by_model[m].blocks[s.name][i][keep[s.name]] for i in parts for m in models], norm)
                    for s in (train, test)
                ]
            )
            outcomes = run_protocol(X, Y, splits, p, pipeline.head, len(ACTIONS), jobs=jobs)
            paper = pipeline.paper_result(models, setting)
            label = f"{paper.label if paper else ' & '.join(models)}, {setting_name}"
            records = [o.fit | (ap_record(o, ACTIONS, p.metric) if scored else {}) for o in outcomes]
            if scored:
                curves[label] = pr_curves(outcomes[0], ACTIONS)
            results.append(result_row(label, models, records, setting=setting))
            last[setting] = outcomes[0].scores
    return results, curves, last


def write_results(folder: Path, persons: ActionSet, keep: np.ndarray, scores: np.ndarray) -> list[Path]:
    """The devkit's result files: `comp10_action_<set>_<action>.txt`, `<id> <object index> <score>`."""
    make_dir(folder)
    ids = [i for i, k in zip(persons.ids, keep) if k]
    objects = [o for o, k in zip(persons.objects, keep) if k]
    written = []
    for j, action in enumerate(ACTIONS):
        path = folder / f"{COMP}_action_{persons.name}_{action}.txt"
        write_text("".join(f"{i} {o} {s:.6f}\n" for i, o, s in zip(ids, objects, scores[:, j])), path)
        written.append(path)
    return written


def _join(a: ActionSet, b: ActionSet, name: str) -> ActionSet:
    return ActionSet(
        name, a.ids + b.ids, a.objects + b.objects, np.vstack([a.boxes, b.boxes]), np.vstack([a.labels, b.labels])
    )
