"""Fetch a dataset archive from its official host with an md5 check, resume, and unpack it.

A transfer is written to `<file>.part` and only renamed to `<file>` once every byte arrived and
the md5 matches, so an interrupted or corrupted download is never mistaken for the dataset;
the next run resumes the `.part` with an HTTP Range request where the server allows it.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import tarfile
import zipfile
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from featx.errors import BadInput, MissingData, option

CHUNK = 1 << 20
USER_AGENT = "featx (https://arxiv.org/abs/1409.1556 transfer experiments)"


class DownloadError(MissingData):
    """The archive could not be obtained (offline, refused, interrupted); says how to get it."""


class ChecksumError(BadInput):
    """A file's md5 differs from the official one; says what to delete and how to retry."""


def file_md5(path: str | Path, *, chunk: int = CHUNK) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: str | Path, md5: str, *, timeout: float = 30.0, progress: bool = False) -> Path:
    """Download `url` to `dest` unless it is already there with the right md5; resume a `.part`."""
    dest = Path(dest)
    if dest.is_file():
        got = file_md5(dest)
        if got == md5:
            return dest
        raise ChecksumError(
            f"{dest} has md5 {got}, expected {md5}: it is not the official file or it is "
            f"damaged; delete it and rerun with {option('download')}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as err:
        if err.code == 416 and have:
            # Range past the end: the .part already holds the whole file; the md5 decides.
            return _finish(part, dest, url, md5, file_md5(part))
        raise DownloadError(f"could not fetch {url}: HTTP {err.code} {err.reason}") from err
    except (URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"could not reach {url} ({reason})") from err

    with response:
        h = hashlib.md5()
        resumed = have > 0 and response.status == 206 and _range_start(response) == have
        if resumed:
            with open(part, "rb") as f:
                while block := f.read(CHUNK):
                    h.update(block)
        else:
            have = 0  # the server ignored the Range request: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        got = have
        bar = _progress_bar(dest.name, total, have) if progress else None
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while block := response.read(CHUNK):
                    f.write(block)
                    h.update(block)
                    got += len(block)
                    if bar is not None:
                        bar[0].update(bar[1], completed=got)
        except (http.client.HTTPException, OSError) as err:
            raise _interrupted(url, part, got, total, err) from err
        finally:
            if bar is not None:
                bar[0].stop()
        # http.client returns b"" when the peer closes early instead of raising: count bytes.
        if total is not None and got < total:
            raise _interrupted(url, part, got, total, "connection closed early")
    return _finish(part, dest, url, md5, h.hexdigest())


def _finish(part: Path, dest: Path, url: str, md5: str, got: str) -> Path:
    if got != md5:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"{url} gave md5 {got}, expected {md5}; the download was deleted: rerun with "
            f"{option('download')} to fetch it again, or download it by hand into {dest}"
        )
    part.replace(dest)
    return dest


def _interrupted(url: str, part: Path, got: int, total: int | None, why) -> DownloadError:
    of = f" of {total}" if total is not None else ""
    return DownloadError(
        f"transfer of {url} interrupted after {got}{of} bytes ({why}); kept {part}: "
        f"rerun with {option('download')} to resume"
    )


def _range_start(response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _progress_bar(name: str, total: int | None, done: int):
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
    task = bar.add_task(f"download {name}", total=total, completed=done)
    bar.start()
    return bar, task


def unpack(archive: str | Path, into: str | Path, *, inner: str | None = None) -> None:
    """Unpack a zip or tar (any compression) into `into`; `inner` names an archive inside it."""
    archive, into = Path(archive), Path(into)
    into.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                if inner is not None:
                    if inner not in zf.namelist():
                        # Same archive under another folder name: match on the file name alone.
                        same = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == inner.rsplit("/", 1)[-1]]
                        inner = same[0] if len(same) == 1 else inner
                    if inner not in zf.namelist():
                        raise BadInput(
                            f"{archive} does not hold {inner}; it is not the official archive: "
                            f"delete it and rerun with {option('download')}"
                        )
                    with zf.open(inner) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
                        tf.extractall(into, filter="data")
                else:
                    _safe_unzip(zf, into)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                tf.extractall(into, filter="data")
        else:
            raise BadInput(
                f"{archive} is neither a zip nor a tar archive; delete it and rerun with {option('download')}"
            )
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise BadInput(f"{archive} is damaged ({err}); delete it and rerun with {option('download')}") from err


def _safe_unzip(zf: zipfile.ZipFile, into: Path) -> None:
    base = into.resolve()
    for name in zf.namelist():
        # Same guard as tarfile's "data" filter: no member may land outside `into`.
        if not (base / name).resolve().is_relative_to(base):
            raise BadInput(f"zip member {name!r} would unpack outside {into}; archive refused")
    zf.extractall(into)


def _marker(folder: Path, filename: str) -> Path:
    return folder / f".{filename}.unpacked"


def is_unpacked(folder: str | Path, filename: str, md5: str) -> bool:
    """Whether `filename` with this md5 was fully unpacked into `folder` by an earlier run."""
    marker = _marker(Path(folder), filename)
    return marker.is_file() and marker.read_text().strip() == md5


def mark_unpacked(folder: str | Path, filename: str, md5: str) -> None:
    """Record that `filename` (with this md5) is fully unpacked into `folder`."""
    _marker(Path(folder), filename).write_text(md5 + "\n")
