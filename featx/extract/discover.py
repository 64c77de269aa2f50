"""Find the images under the given paths, in a sorted, deterministic order."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image

from featx.errors import BadInput, MissingData


@dataclass(frozen=True)
class Item:
    """One image to describe: where it is, its path as recorded, and its class label."""

    file: Path  # absolute, to open
    path: str  # relative to the PATH it came from, posix, as written to the Parquet row
    label: str | None  # parent folder name below that PATH; None for loose files
    # A region of the image (featx extract --regions): its id and box (x1, y1, x2, y2), upright
    # pixels, 0-based, x2/y2 exclusive. None for a whole image.
    region: str | None = None
    box: tuple[int, int, int, int] | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        """What identifies the item's row in a feature file (resume, deduplication)."""
        return (self.path, self.region)


@cache
def image_extensions() -> frozenset[str]:
    """Every file extension Pillow registers a format for (".jpg", ".png", ".webp", ...)."""
    Image.init()
    return frozenset(Image.registered_extensions())


def has_image_extension(path: str | Path) -> bool:
    """The one rule for "is this named like an image": an extension Pillow registers.

    Discovery also takes extension-less files whose header Pillow recognises (Caltech ships
    some); this is the cheap test by name alone.
    """
    return Path(path).suffix.lower() in image_extensions()


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _looks_like_image(file: Path, extensions: frozenset[str]) -> bool:
    """Known image extension, or Pillow recognises the header (Caltech ships extension-less JPEGs)."""
    if file.suffix.lower() in extensions:
        return True
    try:
        with Image.open(file):
            return True
    except Exception:  # not an image, unreadable: not ours to report
        return False


def discover(paths: list[str | Path]) -> list[Item]:
    """Every image under `paths` (folders recursively, or files), hidden files skipped.

    A file with an image extension is listed even if it turns out unreadable, so that it is
    reported as a failure rather than silently dropped.
    """
    if not paths:
        raise BadInput("no PATH given; name at least one image folder or file")
    extensions = image_extensions()
    items: list[Item] = []
    seen: dict[str, Path] = {}
    for given in paths:
        root = Path(given).expanduser()
        if root.is_file():
            found = [Item(root.resolve(), root.name, None)] if _looks_like_image(root, extensions) else []
            if not found:
                raise BadInput(f"{root} is not an image Pillow can open; give image files or folders")
        elif root.is_dir():
            found = _walk(root, extensions)
        else:
            raise MissingData(f"{root}: no such file or folder; check the PATH")
        for item in found:
            if item.path in seen and seen[item.path] != item.file:
                raise BadInput(
                    f"two images would be recorded as {item.path!r} ({seen[item.path]} and "
                    f"{item.file}); pass their common parent folder instead"
                )
            if item.path not in seen:
                seen[item.path] = item.file
                items.append(item)
    return items


def walk(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """(folder, sub-folder names, file names) for every folder under `root`, sorted.

    The one rule for listing images (discovery and the dataset loaders): a symlinked folder
    counts like a real one, hidden folders are skipped, and a link back to a folder above it
    (a loop) is skipped, so a loop neither hangs the walk nor lists an image twice.
    """
    # Identities (device, inode) of each pending folder's ancestors, the folder itself last.
    above: dict[str, tuple[tuple[int, int], ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = os.stat(dirpath)
        chain = (*above.pop(dirpath, ()), (here.st_dev, here.st_ino))
        kept = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            try:
                st = os.stat(os.path.join(dirpath, d))
            except OSError:  # a broken link
                continue
            if (st.st_dev, st.st_ino) not in chain:
                kept.append(d)
                above[os.path.join(dirpath, d)] = chain
        dirnames[:] = kept
        yield Path(dirpath), list(kept), sorted(filenames)


def subfolders(folder: Path) -> list[Path]:
    """The visible sub-folders of `folder`, sorted, symlinked ones included (`walk`'s rule)."""
    _, names, _ = next(walk(folder))
    return [folder / name for name in names]


def _walk(root: Path, extensions: frozenset[str]) -> list[Item]:
    found = []
    for folder, _, filenames in walk(root):
        for name in filenames:
            file = folder / name
            rel = file.relative_to(root)
            if _is_hidden(rel) or not file.is_file():
                continue
            if _looks_like_image(file, extensions):
                label = rel.parent.name if len(rel.parts) > 1 else None
                found.append(Item(file.resolve(), rel.as_posix(), label))
    found.sort(key=lambda item: item.path)
    return found
