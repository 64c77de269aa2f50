"""Find the images under the given paths, in a sorted, deterministic order."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from PIL import Image

from featx.errors import BadInput, MissingData
from featx.extract.imagefile import ImageError, broken_link, is_image, not_a_file


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
    # Why discovery already knows this file cannot become a row: (stage, error, message) of its
    # errors-table entry (a broken link, a FIFO, a name taken by another file); None to decode.
    failure: tuple[str, str, str] | None = None

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


def as_text(name: str) -> str:
    """A file name as UTF-8 text, losslessly: each byte that is not UTF-8 written as `\\xNN`.

    Python reads such a byte of a name as a lone surrogate (U+DC80..U+DCFF, PEP 383), which
    Parquet cannot hold; the escape is Python's `backslashreplace` of the raw bytes. Names that
    are valid UTF-8 are returned as they are.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    out = []
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:  # a lone surrogate of another origin (a Windows name)
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _look_at(
    file: Path, path: str, label: str | None, extensions: frozenset[str], real_folder: Path | None = None
) -> Item | None:
    """The Item of one file discovery looks at, or None if it is no image.

    A file named like an image (or a header Pillow knows) always gets an Item, so it ends as a
    row or an errors entry: a broken link, a FIFO or an unreadable file carries its failure.
    `real_folder`, the file's folder resolved, spares resolving each file that is no link.
    """
    named = file.suffix.lower() in extensions
    try:
        st = os.lstat(file)
        linked = stat.S_ISLNK(st.st_mode)
        if linked:
            st = os.stat(file)
    except OSError as e:
        if not named:
            return None
        failure = (
            broken_link(file)
            if isinstance(e, FileNotFoundError) and file.is_symlink()
            else ImageError("read", type(e).__name__, f"cannot read the file: {e.strerror or e}")
        )
        return Item(file.absolute(), path, label, failure=(failure.stage, failure.error, failure.message))
    if not stat.S_ISREG(st.st_mode):
        if not named:
            return None  # a FIFO or device not named like an image: not ours (and never opened)
        failure = not_a_file(st.st_mode)
        return Item(file.absolute(), path, label, failure=(failure.stage, failure.error, failure.message))
    if not named:
        try:
            if not is_image(file):
                return None
        except ImageError as e:  # cannot even be read: it might be an image, so it is reported
            return Item(_real(file, linked, real_folder), path, label, failure=(e.stage, e.error, e.message))
    return Item(_real(file, linked, real_folder), path, label)


def _real(file: Path, linked: bool, real_folder: Path | None) -> Path:
    # resolve() lstats every component of the path: per file, that was most of discovering
    # 100k files; a file that is no link is its resolved folder's entry.
    return file.resolve() if linked or real_folder is None else real_folder / file.name


def discover(paths: list[str | Path]) -> list[Item]:
    """Every image under `paths` (folders recursively, or files), hidden files skipped.

    A file named like an image is listed even if it turns out unreadable, so that it is
    reported as a failure rather than silently dropped: a broken link or a FIFO carries its
    failure (Item.failure) and is never opened. A name that is not UTF-8 is recorded as
    `as_text` writes it.
    """
    if not paths:
        raise BadInput("no PATH given; name at least one image folder or file")
    extensions = image_extensions()
    items: list[Item] = []
    seen: dict[str, Path] = {}
    for given in paths:
        root = Path(given).expanduser()
        if root.is_dir():
            found = _walk(root, extensions)
        elif os.path.lexists(root):
            item = _look_at(root, as_text(root.name), None, extensions)  # a loose file: no class folder
            if item is None:
                raise BadInput(f"{root} is not an image Pillow can open; give image files or folders")
            found = [item]
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
    found: dict[str, Item] = {}
    escaped: list[Item] = []  # names that are not UTF-8, recorded as `as_text` writes them
    for folder, _, filenames in walk(root):
        # Once per folder, not per file: its real path, its relative one, its label.
        rel_folder = folder.relative_to(root)
        if _is_hidden(rel_folder):
            continue
        real_folder = folder.resolve()
        prefix = f"{rel_folder.as_posix()}/" if rel_folder.parts else ""
        label = rel_folder.name if rel_folder.parts else None
        for name in filenames:
            if name.startswith("."):
                continue
            file = folder / name
            path = prefix + name
            text = as_text(path)
            item = _look_at(file, text, None if label is None else as_text(label), extensions, real_folder)
            if item is None:
                continue
            if text == path:
                found[path] = item
            else:
                escaped.append(item)
    for item in escaped:
        if item.path in found:
            # Another file's real name reads like this one's escaped name: this one is listed
            # under a name no file has, with the reason, so neither is lost or mixed up.
            item = replace(
                item,
                path=item.path + " (not UTF-8)",
                failure=(
                    "discover",
                    "NameCollision",
                    f"its name is not UTF-8, and the text featx writes for it ({item.path}) is another file's "
                    "name; rename one of them",
                ),
            )
        found.setdefault(item.path, item)
    return sorted(found.values(), key=lambda item: item.path)
