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
            (main / f"{cls}_{name}.txt").write_text(
                "".join(f"{i} {labels[j, k]:2d}\n" for j, i in enumerate(ids))
            )
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
