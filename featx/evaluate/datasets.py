"""The paper's transfer datasets: where they come from, how they are laid out, what they hold.

Simonyan & Zisserman, arXiv 1409.1556, Appendix B: Caltech-101 (102 classes, the background
class kept), Caltech-256 (257 classes, clutter kept), PASCAL VOC 2007 and 2012 classification.
The facts below (urls, md5s, folder names, sizes) are data; `load_dataset` lists a copy under
--root laid out as torchvision lays it, and `ensure_dataset` fetches it with checksums.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from featx.errors import BadInput, MissingData, option
from featx.evaluate.download import (
    DownloadError,
    fetch,
    is_unpacked,
    mark_unpacked,
    unpack,
)
from featx.extract.discover import has_image_extension, subfolders

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# VOC2012 action classification: the ten actions of a person instance.
ACTIONS = (
    "jumping", "phoning", "playinginstrument", "reading", "ridingbike", "ridinghorse",
    "running", "takingphoto", "usingcomputer", "walking",
)  # fmt: skip


@dataclass(frozen=True)
class Archive:
    """One file of a dataset on its official host, tried in the order of `urls`."""

    filename: str
    urls: tuple[str, ...]
    md5: str
    # Caltech-101's zip wraps the images in a second archive; this names it inside the first.
    inner: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """Facts about one dataset: layout under --root, archives, and the size of a full copy."""

    name: str
    title: str
    kind: Literal["caltech", "voc", "voc_action"]
    # Where the archives are saved and unpacked, relative to --root.
    folder: str
    # The image folder (Caltech: class folders inside; VOC: the devkit year folder).
    images: str
    archives: tuple[Archive, ...]
    n_classes: int
    # Images in a full copy: Caltech all folders; VOC per image set.
    n_images: dict[str, int]
    homepage: str
    # Caltech's non-object class, kept by the paper, dropped with --no-background.
    background: str | None = None
    # VOC image sets: training and test (the test set is the one results are reported on).
    train_set: str = ""
    test_set: str = ""
    # Other accepted locations of `images` relative to --root (e.g. a bare class-folder tree).
    also: tuple[str, ...] = ()
    note: str = ""

    def replace(self, **changes) -> DatasetSpec:
        return dataclasses.replace(self, **changes)


_OX = ("http://host.robots.ox.ac.uk/pascal/VOC", "https://thor.robots.ox.ac.uk/pascal/VOC")

DATASETS: dict[str, DatasetSpec] = {
    "caltech101": DatasetSpec(
        name="caltech101",
        title="Caltech-101",
        kind="caltech",
        folder="caltech101",
        images="caltech101/101_ObjectCategories",
        also=("101_ObjectCategories",),
        archives=(
            Archive(
                filename="caltech-101.zip",
                urls=("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",),
                md5="3138e1922a9193bfa496528edbbc45d0",
                inner="caltech-101/101_ObjectCategories.tar.gz",
            ),
        ),
        n_classes=102,
        n_images={"all": 9144},
        background="BACKGROUND_Google",
        homepage="https://data.caltech.edu/records/mzrjq-6wc02",
    ),
    "caltech256": DatasetSpec(
        name="caltech256",
        title="Caltech-256",
        kind="caltech",
        folder="caltech256",
        images="caltech256/256_ObjectCategories",
        also=("256_ObjectCategories",),
        archives=(
            Archive(
                filename="256_ObjectCategories.tar",
                urls=("https://data.caltech.edu/records/nyy15-4j048/files/256_ObjectCategories.tar",),
                md5="67b4f42ca05d46448c6bb8ecd2220f6d",
            ),
        ),
        n_classes=257,
        n_images={"all": 30607},
        background="257.clutter",
        homepage="https://data.caltech.edu/records/nyy15-4j048",
    ),
    "voc2007": DatasetSpec(
        name="voc2007",
        title="PASCAL VOC 2007",
        kind="voc",
        folder=".",
        images="VOCdevkit/VOC2007",
        archives=(
            Archive(
                filename="VOCtrainval_06-Nov-2007.tar",
                urls=tuple(f"{h}/voc2007/VOCtrainval_06-Nov-2007.tar" for h in _OX),
                md5="c52e279531787c972589f7e41ab4ae64",
            ),
            Archive(
                filename="VOCtest_06-Nov-2007.tar",
                urls=tuple(f"{h}/voc2007/VOCtest_06-Nov-2007.tar" for h in _OX),
                md5="b6e924de25625d8de591ea690078ad9f",
            ),
        ),
        n_classes=20,
        n_images={"trainval": 5011, "test": 4952},
        train_set="trainval",
        test_set="test",
        homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2007/",
    ),
    "voc2012": DatasetSpec(
        name="voc2012",
        title="PASCAL VOC 2012",
        kind="voc",
        folder=".",
        images="VOCdevkit/VOC2012",
        archives=(
            Archive(
                filename="VOCtrainval_11-May-2012.tar",
                urls=tuple(f"{h}/voc2012/VOCtrainval_11-May-2012.tar" for h in _OX),
                md5="6cd6e144f989b92b3379bac3b3de84fd",
            ),
        ),
        n_classes=20,
        n_images={"train": 5717, "val": 5823},
        train_set="train",
        test_set="val",
        homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
        note=(
            "VOC2012 test labels are not public: featx trains on train and tests on val; "
            "the paper's numbers come from the evaluation server on test"
        ),
    ),
}
# VOC2012 action classification (Table 12) ships in the same trainval archive as voc2012.
# Sizes: person instances per set in the devkit's ImageSets/Action (VOC2012 devkit doc).
DATASETS["voc2012-action"] = DATASETS["voc2012"].replace(
    name="voc2012-action",
    title="PASCAL VOC 2012 action",
    kind="voc_action",
    n_classes=10,
    n_images={"train": 3134, "val": 3144},
    note=(
        "VOC2012 action test labels are not public: featx trains on train and tests on val; "
        "the paper's 79.2 / 84.0 are evaluation-server numbers on test (--test-server writes "
        "the files to upload)"
    ),
)


@dataclass(frozen=True, eq=False)
class DatasetIndex:
    """The images of one dataset copy with their labels, in a deterministic (sorted) order."""

    name: str
    # Folder the image paths are relative to (what the features' `path` column is relative to).
    image_dir: Path
    paths: tuple[str, ...]
    classes: tuple[str, ...]
    # Caltech: class index per image, shape (n,). VOC: {1, -1, 0} per image and class, (n, 20).
    labels: np.ndarray
    # VOC: image set name -> row indices (train_set, test_set). Caltech: empty.
    subsets: dict[str, np.ndarray] = field(default_factory=dict)
    # What is missing or odd in this copy (it still runs; results are then not the paper's).
    problems: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for `name`."""
    if name not in DATASETS:
        raise BadInput(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(
    name: str | DatasetSpec,
    root: str | Path,
    *,
    background: bool = True,
    download: bool = False,
    progress: bool = False,
) -> DatasetIndex:
    """List the images and labels of a dataset copy under `root`, downloading it if asked."""
    spec = name if isinstance(name, DatasetSpec) else get_spec(name)
    root = Path(root).expanduser()
    if not background and spec.background is None:
        raise BadInput(f"--no-background applies to Caltech only; {spec.name} has no background class")
    if download:
        ensure_dataset(spec, root, progress=progress)
    if spec.kind == "caltech":
        return _load_caltech(spec, root, background=background)
    return _load_voc(spec, root)


def find_images(spec: DatasetSpec, root: Path) -> Path | None:
    """The image folder of `spec` under `root`, in the torchvision layout or an accepted other."""
    for rel in (spec.images, *spec.also):
        if (root / rel).is_dir():
            return root / rel
    return None


def where_to_put(spec: DatasetSpec, root: Path, *, downloading: bool = False) -> str:
    """One line telling how to get the dataset into `root` by hand or with --download."""
    dest = root / spec.folder
    files = " and ".join(f"{a.filename} ({a.urls[0]}, md5 {a.md5})" for a in spec.archives)
    return (
        "to download by hand, " if downloading else f"run with {option('download')}, or "
    ) + f"fetch {files} into {dest.resolve()} and rerun with {option('download')} (it verifies the md5 and unpacks)"


def ensure_dataset(spec: DatasetSpec, root: Path, *, progress: bool = False) -> None:
    """Fetch (checksummed) and unpack the archives of `spec` that are not unpacked under `root` yet."""
    images = find_images(spec, root)
    if images is not None and not _shortfall(spec, images):
        return  # a full copy is already there (perhaps unpacked by hand): nothing to fetch
    dest = root / spec.folder
    dest.mkdir(parents=True, exist_ok=True)
    for archive in spec.archives:
        if is_unpacked(dest, archive.filename, archive.md5):
            continue
        path = dest / archive.filename
        errors = []
        for url in archive.urls:
            try:
                fetch(url, path, archive.md5, progress=progress)
                break
            except DownloadError as err:
                errors.append(str(err))
        else:
            raise DownloadError(f"{'; '.join(errors)}; {where_to_put(spec, root, downloading=True)}")
        unpack(path, dest, inner=archive.inner)
        mark_unpacked(dest, archive.filename, archive.md5)


def _missing(spec: DatasetSpec, root: Path) -> MissingData:
    return MissingData(
        f"{spec.title} not found under {root}: expected {root / spec.images}; " + where_to_put(spec, root)
    )


def _shortfall(spec: DatasetSpec, images: Path) -> list[str]:
    """What a copy at `images` lacks against a full copy (cheap: counts only)."""
    if spec.kind == "caltech":
        folders = subfolders(images)
        n = sum(len(_class_images(d)) for d in folders)
        out = []
        if len(folders) < spec.n_classes:
            out.append(f"{len(folders)} of {spec.n_classes} class folders")
        if n < spec.n_images["all"]:
            out.append(f"{n} of {spec.n_images['all']} images")
        return out
    if spec.kind == "voc_action":
        return action_shortfall(spec, images)
    out = []
    for name, full in spec.n_images.items():
        listed = images / "ImageSets" / "Main" / f"{name}.txt"
        n = len(_read_ids(listed)) if listed.is_file() else 0
        if n < full:
            out.append(f"{n} of {full} {name} images")
    return out


def _class_images(folder: Path) -> list[str]:
    """The images of a class folder by name (featx's one rule); stray notes, hidden files and
    sub-folders are skipped."""
    return sorted(
        p.name for p in folder.iterdir() if has_image_extension(p) and not p.name.startswith(".") and p.is_file()
    )


def _load_caltech(spec: DatasetSpec, root: Path, *, background: bool) -> DatasetIndex:
    images = find_images(spec, root)
    if images is None:
        raise _missing(spec, root)
    problems = []
    classes, paths, labels = [], [], []
    for folder in subfolders(images):
        if not background and folder.name == spec.background:
            continue
        files = _class_images(folder)
        if not files:
            problems.append(f"class folder {folder.name} holds no images and is left out")
            continue
        paths.extend(f"{folder.name}/{f}" for f in files)
        labels.extend([len(classes)] * len(files))
        classes.append(folder.name)
    if not classes:
        raise MissingData(f"no class folders with images under {images}; " + where_to_put(spec, root))
    short = _shortfall(spec, images)
    if short:
        problems.insert(
            0,
            f"{spec.title} at {images} is incomplete ({', '.join(short)}): results are not comparable to the paper",
        )
    if background and spec.background and spec.background not in classes:
        problems.append(f"the background class {spec.background} is missing (the paper keeps it)")
    return DatasetIndex(
        name=spec.name,
        image_dir=images,
        paths=tuple(paths),
        classes=tuple(classes),
        labels=np.asarray(labels, dtype=np.int64),
        problems=tuple(problems),
    )


def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _read_class_labels(path: Path) -> dict[str, int]:
    labels = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
            raise BadInput(
                f"{path}:{n}: expected '<image id> <1|-1|0>', got {line!r}; "
                "the file is damaged: unpack the VOC archive again"
            )
        labels[parts[0]] = int(parts[1])
    return labels


def _load_voc(spec: DatasetSpec, root: Path) -> DatasetIndex:
    year = find_images(spec, root)
    if year is None:
        raise _missing(spec, root)
    main = year / "ImageSets" / "Main"
    ids_by_set: dict[str, list[str]] = {}
    labels_by_set: dict[str, np.ndarray] = {}
    for subset in (spec.train_set, spec.test_set):
        wanted = [main / f"{subset}.txt"] + [main / f"{c}_{subset}.txt" for c in VOC_CLASSES]
        absent = [p.name for p in wanted if not p.is_file()]
        if absent:
            raise MissingData(
                f"{spec.title} {subset} set incomplete under {main}: missing "
                f"{', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''} "
                f"({len(absent)} files); " + where_to_put(spec, root)
            )
        ids = _read_ids(main / f"{subset}.txt")
        table = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.int8)
        for k, cls in enumerate(VOC_CLASSES):
            per_image = _read_class_labels(main / f"{cls}_{subset}.txt")
            unknown = [i for i in ids if i not in per_image]
            if unknown:
                raise BadInput(
                    f"{main / f'{cls}_{subset}.txt'} has no label for image {unknown[0]} of "
                    f"{subset}.txt ({len(unknown)} missing); unpack the VOC archive again"
                )
            table[:, k] = [per_image[i] for i in ids]
        ids_by_set[subset], labels_by_set[subset] = ids, table
    if set(ids_by_set[spec.train_set]) & set(ids_by_set[spec.test_set]):
        raise BadInput(
            f"{spec.train_set} and {spec.test_set} share images under {main}; "
            "the copy mixes image sets: unpack the official archives again"
        )
    jpegs = year / "JPEGImages"
    paths = [f"{i}.jpg" for s in (spec.train_set, spec.test_set) for i in ids_by_set[s]]
    absent = [p for p in paths if not (jpegs / p).is_file()]
    if absent:
        raise MissingData(
            f"{len(absent)} images listed in ImageSets/Main are missing from {jpegs} "
            f"(first: {absent[0]}); " + where_to_put(spec, root)
        )
    n_train = len(ids_by_set[spec.train_set])
    short = _shortfall(spec, year)
    problems = []
    if short:
        problems.append(
            f"{spec.title} at {year} is incomplete ({', '.join(short)}): results are not comparable to the paper"
        )
    return DatasetIndex(
        name=spec.name,
        image_dir=jpegs,
        paths=tuple(paths),
        classes=VOC_CLASSES,
        labels=np.concatenate([labels_by_set[spec.train_set], labels_by_set[spec.test_set]]),
        subsets={
            spec.train_set: np.arange(n_train),
            spec.test_set: np.arange(n_train, len(paths)),
        },
        problems=tuple(problems),
    )


def action_shortfall(spec: DatasetSpec, year: Path) -> list[str]:
    """What a copy lacks against the full action sets (persons listed, cheap line counts)."""
    out = []
    for name, full in spec.n_images.items():
        files = [year / "ImageSets" / "Action" / f"{a}_{name}.txt" for a in ACTIONS]
        n = max(
            (sum(1 for line in f.read_text().splitlines() if line.strip()) for f in files if f.is_file()), default=0
        )
        if n < full:
            out.append(f"{n} of {full} {name} persons")
    return out
