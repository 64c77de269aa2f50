"""Tiny Caltech and VOC copies in the real layouts, and archives in the official formats.

Images are small generated JPEGs (a class colour plus noise) so that extraction stays fast.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from featx.evaluate.datasets import VOC_CLASSES

# Caltech-101's quirks kept: the background class, Faces beside Faces_easy, a grayscale image.
CALTECH_CLASSES = ("BACKGROUND_Google", "Faces", "Faces_easy", "anchor")


def jpeg(path: Path, seed: int, size=(32, 32), gray: bool = False) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    pixels = np.clip(base + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    (image.convert("L") if gray else image).save(path, quality=80)


def make_caltech(folder: Path, per_class: dict[str, int] | None = None) -> Path:
    """<folder>/<class>/image_NNNN.jpg, plus a stray text file and a hidden file."""
    per_class = per_class or dict.fromkeys(CALTECH_CLASSES, 6)
    for k, (cls, n) in enumerate(sorted(per_class.items())):
        for i in range(1, n + 1):
            jpeg(folder / cls / f"image_{i:04d}.jpg", seed=100 * k + i, gray=(k, i) == (1, 1))
    first = sorted(per_class)[-1]
    (folder / first / "notes.txt").write_text("not an image\n")
    (folder / first / ".DS_Store").write_bytes(b"\0\0")
    return folder


def make_voc(root: Path, year: str = "2007", sets: dict[str, int] | None = None) -> Path:
    """root/VOCdevkit/VOC<year> with JPEGImages and ImageSets/Main label files.

    Image i is positive for class i % 20 and i % 7 (so most classes have positives in every
    set); the first image of each set is difficult-only (0) for class 19 and negative
    otherwise except its own positive.
    """
    sets = sets or {"trainval": 10, "test": 8}
    base = root / "VOCdevkit" / f"VOC{year}"
    main = base / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    counter = 0
    for name, n in sets.items():
        ids = []
        labels = np.full((n, len(VOC_CLASSES)), -1)
        for j in range(n):
            counter += 1
            image_id = f"{counter:06d}"
            ids.append(image_id)
            labels[j, counter % 20] = 1
            labels[j, counter % 7] = 1
            jpeg(base / "JPEGImages" / f"{image_id}.jpg", seed=counter)
        labels[0, 19] = 0 if labels[0, 19] != 1 else 1
        (main / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
        for k, cls in enumerate(VOC_CLASSES):
            (main / f"{cls}_{name}.txt").write_text("".join(f"{i} {labels[j, k]:2d}\n" for j, i in enumerate(ids)))
    # An image no set lists (VOC2012's folder holds many): it must not be described.
    jpeg(base / "JPEGImages" / "999999.jpg", seed=999)
    return base


def caltech101_zip(path: Path, per_class: dict[str, int] | None = None) -> Path:
    """caltech-101.zip as CaltechDATA ships it: caltech-101/101_ObjectCategories.tar.gz inside."""
    tree = path.parent / "_tree"
    make_caltech(tree / "101_ObjectCategories", per_class)
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tf:
        tf.add(tree / "101_ObjectCategories", arcname="101_ObjectCategories")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("caltech-101/101_ObjectCategories.tar.gz", inner.getvalue())
        zf.writestr("caltech-101/Annotations.tar", b"")
        zf.writestr("caltech-101/show_annotation.m", "% not needed\n")
    return path


# Ten clearly different looks, one per action, so that even a random net tells the persons apart.
ACTION_COLOURS = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (250, 250, 250), (0, 0, 0),
)  # fmt: skip
ACTION_PERSON_BOXES = ((8, 12, 52, 108), (60, 20, 100, 110), (110, 8, 150, 100))  # 0-based, x2/y2 exclusive


def make_voc_action(root: Path, sets: dict[str, int] | None = None) -> Path:
    """root/VOCdevkit/VOC2012 with ImageSets/Action, Annotations and JPEGImages of persons.

    Image i of the listing holds a bicycle (object 1) and three persons (objects 2-4); person j
    does action (3 * i + j) % 10 and is painted in that action's colour over grey noise, so the
    persons of one image differ. As in the real devkit, the XML boxes are 1-based and
    inclusive, the jumping files list fewer persons (the last image is left out), and one val
    person is 0 (ignored) for walking. Returns the year folder.
    """
    from featx.evaluate.datasets import ACTIONS

    sets = sets or {"train": 8, "val": 8}
    base = root / "VOCdevkit" / "VOC2012"
    folder = base / "ImageSets" / "Action"
    folder.mkdir(parents=True, exist_ok=True)
    (base / "Annotations").mkdir(parents=True, exist_ok=True)
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    counter = 0
    for name, n in sets.items():
        lines = {a: [] for a in ACTIONS}
        for i in range(n):
            counter += 1
            image_id = f"2011_{counter:06d}"
            rng = np.random.default_rng(counter)
            pixels = rng.integers(90, 160, (120, 160, 3)).astype(np.uint8)
            objects = [("bicycle", (120, 100, 150, 118), None)]
            for j, (x1, y1, x2, y2) in enumerate(ACTION_PERSON_BOXES):
                action = (3 * i + j) % len(ACTIONS)
                pixels[y1:y2, x1:x2] = ACTION_COLOURS[action]
                objects.append(("person", (x1, y1, x2, y2), action))
            Image.fromarray(pixels).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
            (base / "Annotations" / f"{image_id}.xml").write_text(_action_xml(image_id, objects, ACTIONS))
            for k, (_, _, action) in enumerate(objects, 1):
                if action is None:
                    continue
                for a, act in enumerate(ACTIONS):
                    if act == "jumping" and i == n - 1:
                        continue  # the jumping files are shorter
                    label = 1 if a == action else -1
                    if name == "val" and i == 0 and k == 2 and act == "walking" and label == -1:
                        label = 0
                    lines[act].append(f"{image_id} {k} {label:2d}")
        for act, rows in lines.items():
            (folder / f"{act}_{name}.txt").write_text("".join(r + "\n" for r in rows))
        (folder / f"{name}.txt").write_text("".join(sorted({r.split()[0] + "\n" for r in lines["walking"]})))
    return base


def _action_xml(image_id: str, objects, actions) -> str:
    parts = []
    for name, (x1, y1, x2, y2), action in objects:
        acts = ""
        if action is not None:
            acts = "<actions>" + "".join(f"<{a}>{int(k == action)}</{a}>" for k, a in enumerate(actions)) + "</actions>"
        # Children in an unusual order (xmax first): parsers must go by tag name.
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose>{acts}<bndbox><xmax>{x2}</xmax><ymin>{y1 + 1}</ymin>"
            f"<xmin>{x1 + 1}</xmin><ymax>{y2}</ymax></bndbox><difficult>0</difficult></object>"
        )
    return (
        f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename>"
        "<source><database>The VOC2012 Database</database></source>"
        "<size><width>160</width><height>120</height><depth>3</depth></size><segmented>0</segmented>"
        + "".join(parts)
        + "</annotation>\n"
    )
