"""The feature cache of `featx evaluate`: one extraction per image set and descriptor, reused.

An entry is keyed by the descriptor's settings hash (Simonyan & Zisserman, arXiv 1409.1556,
Appendix B: net, weights, layer, scales, flip, aggregation, precision) AND a fingerprint of
the files it describes: their paths (relative to the folder given), sizes and modification
times. Two different copies of a dataset, or a copy in which an image was added, removed or
replaced, never share an entry. Features of regions (e.g. the persons of VOC action) are keyed
by the regions table's identity as well. Entries live in a per-user folder
(`featx.userdirs.cache_dir`), each as `NAME-MODEL-SETTINGS-FILES[-REGIONS].parquet` (a plain
feature file) with `.json` beside it saying what it holds. Listing and removing entries loads
neither torch nor the net.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from featx import __version__, store
from featx.errors import BadInput, Damaged, MissingData, option, words
from featx.extract.config import ExtractConfig
from featx.extract.discover import Item, discover
from featx.store.lock import lock_path
from featx.store.text import settings_text
from featx.userdirs import cache_dir as default_cache_dir


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def fingerprint(items: Iterable[Item]) -> str:
    """A hash of the files `items` name: recorded path, size and mtime (ns) of each, sorted."""
    h = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.path):
        try:
            st = os.stat(item.file)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # a broken link: discovery lists it with its failure (issue 22.6)
            size = mtime = -1
        h.update(f"{item.path}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "images"


def entry_file(
    cache_dir: str | Path, name: str, model: str, settings_hash: str, files_hash: str, regions_hash: str | None = None
) -> Path:
    """Where the features of one image set (by fingerprint) under one descriptor are cached;
    `regions_hash`: of the regions of those images a regions table names."""
    tail = f"-{regions_hash}" if regions_hash else ""
    return Path(cache_dir) / f"{_slug(name)}-{_slug(model)}-{settings_hash}-{files_hash}{tail}.parquet"


@dataclass(frozen=True)
class Cached:
    """Features extracted or reused for a list of images: the file, and what the run did."""

    file: Path
    reused: bool
    new_rows: int
    seconds: float
    fingerprint: str


def cached_features(
    inputs: Sequence[str | Path],
    config: ExtractConfig,
    *,
    name: str,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    wait: bool = True,
    log: Callable[[str], None] | None = None,
    regions=None,
) -> Cached:
    """Extract the features of the images under `inputs`, or reuse the cached ones.

    `inputs` are folders and/or image files as for `featx extract`; `name` says what they
    are (a dataset's name) in `featx cache ls`. An entry with the same settings hash and the
    same files (paths, sizes, mtimes) is reused as it is; an unfinished one is resumed. With
    `wait`, a second process asking for an entry being extracted queues behind the first
    (the entry's lock), then reuses it. `regions` (a table as `featx extract --regions` takes
    it) describes those boxes instead of the whole images: its identity joins the key.
    """
    log = log or (lambda message: None)
    # Torch loads here, not at import: `featx cache ls` and argument errors stay light.
    from featx.extract.provenance import descriptor_hash
    from featx.extract.regions import plan_regions
    from featx.extract.run import extract_features

    cache_dir = resolve_cache_dir(cache_dir)
    items = discover(list(inputs))
    if not items:
        raise MissingData(f"no images under {_listed(inputs)}; check the dataset folder")
    files_hash = fingerprint(items)
    settings = descriptor_hash(config)
    # The regions table's identity as the extraction records it in the file's settings.
    region_id = plan_regions(regions, items, list(inputs)).identity if regions is not None else None
    out = entry_file(cache_dir, name, config.model, settings, files_hash, region_id and region_id["sha256"])
    reused = out.exists()
    what = "region features" if regions is not None else "features"
    log(f"{config.model}: {what} in {out}" + (" (reused)" if reused else ""))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create the cache folder {cache_dir} ({e.strerror}); pass another --cache-dir") from None
    try:
        result = extract_features(list(inputs), out, config, progress=progress, wait=wait, regions=regions)
    except Damaged as e:  # the entry's own fix: remove it, not --overwrite (there is no -o here)
        stem = out.name[: -len(".parquet")]
        remove_it = words(f"featx cache rm {stem}", f"featx.evaluate.cache.remove([{stem!r}])")
        raise Damaged(
            f"the cache entry {stem} is damaged ({e.path.name} cannot be read); remove it with {remove_it} "
            "and run again: it is extracted anew",
            e.path,
        ) from None
    if result.interrupted:
        raise KeyboardInterrupt
    if not out.exists():
        raise BadInput(f"no image under {_listed(inputs)} could be described; see {store.errors_path(out)}")
    info = {
        "name": name,
        "model": config.model,
        "settings_hash": settings,
        "fingerprint": files_hash,
        "images": len(items),
        "rows": result.rows,
        # A regions entry: the table's identity; its rows are regions, not images.
        "regions": region_id,
        # Where the images were (a dataset's folder; VOC passes its listed files).
        "inputs": [str(Path(p).expanduser().resolve()) for p in inputs[:3]] + (["..."] if len(inputs) > 3 else []),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "featx_version": __version__,
    }
    if result.new_rows or not _info_file(out).exists():  # reuse leaves the entry's date alone
        store.write_json(info, _info_file(out))
    return Cached(out, reused and result.new_rows == 0, result.new_rows, result.seconds, files_hash)


def _listed(inputs: Sequence[str | Path]) -> str:
    return ", ".join(map(str, inputs[:3])) + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")


def _info_file(entry: Path) -> Path:
    return entry.with_suffix(".json")


# -- featx cache ls / rm -------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One cache entry as `featx cache ls` shows it."""

    name: str  # the entry's id: its file name without .parquet
    dataset: str
    model: str
    settings: str  # the descriptor in words (the net first), with its settings hash
    images: int | None  # images described (a regions entry: the images its regions lie in)
    bytes: int
    modified: float
    finished: bool
    files: tuple[Path, ...]
    regions: int | None = None  # a regions entry: the regions described


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def entries(cache_dir: str | Path | None = None) -> list[Entry]:
    """The entries under `cache_dir` (default: the per-user folder), finished or not, by name."""
    root = resolve_cache_dir(cache_dir)
    if not root.is_dir():
        return []
    stems = {p.name[: -len(".parquet")] for p in root.glob("*.parquet") if not p.name.endswith(".errors.parquet")}
    stems |= {p.name[: -len(".parquet.partial")] for p in root.glob("*.parquet.partial")}
    found = []
    for stem in sorted(stems):
        files = tuple(sorted(root.glob(f"{glob_escape(stem)}.*")))
        main = root / f"{stem}.parquet"
        info = {}
        if _info_file(main).is_file():
            try:
                info = json.loads(_info_file(main).read_text())
            except (OSError, json.JSONDecodeError):
                info = {}
        try:
            prov = store.read_provenance(main) if main.is_file() else {}
        except (BadInput, MissingData):
            prov = {}
        dataset = info.get("name") or stem.split("-")[0]
        model = info.get("model") or prov.get("model") or "?"
        regions = bool(info.get("regions"))
        found.append(
            Entry(
                name=stem,
                dataset=dataset,
                model=model,
                settings=settings_text(prov) if prov else f"{model}, unfinished run",
                images=info.get("images") if regions else info.get("rows"),
                bytes=sum(_size(f) for f in files),
                modified=max(f.stat().st_mtime for f in files),
                finished=main.is_file(),
                files=files,
                regions=info.get("rows") if regions else None,
            )
        )
    return found


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def remove(names: Sequence[str] = (), *, all: bool = False, cache_dir: str | Path | None = None) -> list[Entry]:
    """Delete the named entries (or every entry with `all`); returns what was removed."""
    root = resolve_cache_dir(cache_dir)
    present = {e.name: e for e in entries(root)}
    if all:
        chosen = list(present.values())
    elif not names:
        raise BadInput(f"name the entries to remove (see `featx cache ls`), or pass {option('all')}")
    else:
        chosen = []
        for n in names:
            key = n[: -len(".parquet")] if n.endswith(".parquet") else Path(n).name
            if key not in present:
                raise MissingData(f"no cache entry {n!r} in {root}; `featx cache ls` lists them")
            chosen.append(present[key])
    for entry in chosen:
        target = root / f"{entry.name}.parquet"
        # The entry's own lock: an evaluation extracting into it makes `rm` refuse (store.Locked).
        with store.OutputLock(target, wait=False):
            for f in entry.files:
                if f.is_dir() and not f.is_symlink():
                    shutil.rmtree(f, ignore_errors=True)
                else:
                    f.unlink(missing_ok=True)
            lock_path(target).unlink(missing_ok=True)
    return chosen
