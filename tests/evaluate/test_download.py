"""Downloads for real, against an HTTP server on 127.0.0.1 serving archives in the official format."""

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from featx.evaluate.datasets import DATASETS, Archive, ensure_dataset, load_dataset
from featx.evaluate.download import (
    ChecksumError,
    DownloadError,
    fetch,
    file_md5,
    unpack,
)
from tests.fake_datasets import caltech101_zip


class Server:
    """Serves `files[name] = bytes`; `cut[name] = n` sends only n bytes of a full-length reply."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                body, start = server.files[name], 0
                ranged = self.headers.get("Range")
                if ranged:
                    start = int(ranged.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                n = server.cut.pop(name, None)
                self.wfile.write(body[start:] if n is None else body[start : start + n])
                if n is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def archive(tmp_path):
    (tmp_path / "src").mkdir()
    path = caltech101_zip(tmp_path / "src" / "caltech-101.zip")
    return path.read_bytes()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _caltech101_from(url: str, md5: str):
    """The real Caltech-101 entry, served from `url` instead of data.caltech.edu."""
    real = DATASETS["caltech101"]
    return real.replace(archives=(Archive("caltech-101.zip", (url,), md5, real.archives[0].inner),))


def test_checksum_match_downloads_unpacks_and_lists(server, archive, tmp_path):
    server.files["caltech-101.zip"] = archive
    spec = _caltech101_from(f"{server.url}/caltech-101.zip", _md5(archive))
    root = tmp_path / "data"
    index = load_dataset(spec, root, download=True)
    assert index.classes == ("BACKGROUND_Google", "Faces", "Faces_easy", "anchor")
    assert index.image_dir == root / "caltech101" / "101_ObjectCategories"
    assert file_md5(root / "caltech101" / "caltech-101.zip") == _md5(archive)
    # A second run finds it unpacked and does not ask the server again.
    n = len(server.requests)
    ensure_dataset(spec, root)
    assert len(server.requests) == n


def test_checksum_mismatch_is_refused_and_nothing_kept(server, archive, tmp_path):
    server.files["caltech-101.zip"] = archive
    dest = tmp_path / "caltech-101.zip"
    with pytest.raises(ChecksumError, match=r"gave md5 [0-9a-f]{32}, expected 0{32}.*rerun with download=True"):
        fetch(f"{server.url}/caltech-101.zip", dest, "0" * 32)
    assert not dest.exists()
    assert not dest.with_name("caltech-101.zip.part").exists()


def test_interrupted_transfer_keeps_part_and_resumes(server, archive, tmp_path):
    server.files["caltech-101.zip"] = archive
    server.cut["caltech-101.zip"] = len(archive) // 3
    dest = tmp_path / "caltech-101.zip"
    url = f"{server.url}/caltech-101.zip"
    with pytest.raises(DownloadError, match=rf"interrupted after {len(archive) // 3} of {len(archive)} bytes.*resume"):
        fetch(url, dest, _md5(archive))
    part = dest.with_name("caltech-101.zip.part")
    assert not dest.exists() and part.stat().st_size == len(archive) // 3
    # The rerun asks only for the rest and ends with the right file.
    fetch(url, dest, _md5(archive))
    assert server.requests[-1] == ("caltech-101.zip", f"bytes={len(archive) // 3}-")
    assert dest.read_bytes() == archive and not part.exists()


def test_offline_error_is_one_line_that_says_where_to_put_the_file(tmp_path):
    # Port 9 on localhost: nothing listens, the connection is refused at once.
    spec = _caltech101_from("http://127.0.0.1:9/caltech-101.zip", DATASETS["caltech101"].archives[0].md5)
    with pytest.raises(DownloadError) as err:
        load_dataset(spec, tmp_path, download=True)
    message = str(err.value)
    assert "\n" not in message
    assert "could not reach http://127.0.0.1:9/caltech-101.zip" in message
    assert f"into {(tmp_path / 'caltech101').resolve()}" in message


def test_archive_put_by_hand_is_verified_and_unpacked_without_network(archive, tmp_path):
    spec = _caltech101_from("http://127.0.0.1:9/unreachable", _md5(archive))
    (tmp_path / "caltech101").mkdir()
    (tmp_path / "caltech101" / "caltech-101.zip").write_bytes(archive)
    assert len(load_dataset(spec, tmp_path, download=True)) == 24


def test_wrong_file_put_by_hand_is_refused(tmp_path):
    dest = tmp_path / "VOCtest_06-Nov-2007.tar"
    dest.write_bytes(b"not the archive")
    with pytest.raises(ChecksumError, match="delete it and rerun with download=True"):
        fetch("http://127.0.0.1:9/x", dest, DATASETS["voc2007"].archives[1].md5)


def test_damaged_archive_is_reported(tmp_path):
    bad = tmp_path / "x.tar"
    bad.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        unpack(bad, tmp_path / "out")
