"""A weights file: its sha256 is read from the user's cache folder while the file is unchanged (no
run hashes VGG16's 528 MB twice), hashed again when it changes, and the cache never breaks a run;
the file is mapped, not read, where torch's format allows."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from featx.errors import BadInput
from featx.extract import provenance
from featx.extract.config import ExtractConfig
from featx.net import weights as net_weights


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty user cache folder, and no hash remembered in this process."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    provenance.forget_file_hashes()
    yield tmp_path / "xdg" / "featx" / "weights-sha256"
    provenance.forget_file_hashes()


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """The files featx reads in full to hash them."""
    seen: list[Path] = []
    real = net_weights.sha256_file

    def counting(path: Path) -> str:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(provenance, "sha256_file", counting)
    monkeypatch.setattr(net_weights, "sha256_file", counting)  # what identify() reads with by itself
    return seen


def weights_file(folder: Path, content: bytes = b"not really a state dict" * 1000) -> Path:
    f = folder / "vgg16-mine.pth"
    f.write_bytes(content)
    return f


def identity(f: Path) -> dict:
    """As a new process sees it: nothing remembered in memory."""
    provenance.forget_file_hashes()
    return provenance.weights_identity(ExtractConfig(weights=str(f)))


def test_a_second_process_reads_the_hash_instead_of_the_file(tmp_path, cache, reads):
    f = weights_file(tmp_path)
    first = identity(f)
    assert first == {"kind": "file", "file": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    assert identity(f) == first
    assert reads == [f]  # hashed once, by the first
    assert len(list(cache.glob("*.json"))) == 1


def test_a_changed_file_is_hashed_again(tmp_path, cache, reads):
    f = weights_file(tmp_path)
    before = identity(f)["sha256"]
    f.write_bytes(b"other weights, the same size!!!" * 1000)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # even within one mtime tick
    after = identity(f)["sha256"]
    assert after == hashlib.sha256(f.read_bytes()).hexdigest() != before
    assert len(reads) == 2


def test_a_file_replaced_under_the_same_name_size_and_mtime_is_hashed_again(tmp_path, cache, reads):
    # An atomic replace (a new inode) with the old size and mtime, as `cp -p` or a sync tool leaves it.
    f = weights_file(tmp_path)
    before = identity(f)["sha256"]
    st = f.stat()
    new = tmp_path / "new.pth"
    new.write_bytes(b"X" * st.st_size)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, f)
    assert identity(f)["sha256"] == hashlib.sha256(b"X" * st.st_size).hexdigest() != before


@pytest.mark.parametrize("damage", ["garbage", "wrong-state", "short-hash"])
def test_a_damaged_entry_is_hashed_again_and_repaired(tmp_path, cache, reads, damage):
    f = weights_file(tmp_path)
    right = identity(f)["sha256"]
    (entry,) = cache.glob("*.json")
    record = json.loads(entry.read_text())
    entry.write_text(
        {
            "garbage": "{not json",
            "wrong-state": json.dumps(record | {"state": record["state"] | {"size": 1}}),
            "short-hash": json.dumps(record | {"sha256": "ab"}),
        }[damage]
    )
    assert identity(f)["sha256"] == right
    assert identity(f)["sha256"] == right
    assert len(reads) == 2  # once at first, once for the damaged entry, then remembered again


def test_an_unwritable_cache_folder_costs_a_hash_per_run_and_nothing_else(tmp_path, monkeypatch, reads):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # cache_dir() is below a file: cannot be made
    f = weights_file(tmp_path)
    assert identity(f)["sha256"] == identity(f)["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert len(reads) == 2


def test_concurrent_processes_agree_and_leave_one_whole_entry(tmp_path, cache):
    f = weights_file(tmp_path, os.urandom(3 << 20))
    results: list[str] = []

    def run() -> None:
        results.append(provenance.file_sha256(f))

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {hashlib.sha256(f.read_bytes()).hexdigest()}
    (entry,) = cache.glob("*.json")  # no temporary file left beside it
    assert json.loads(entry.read_text())["sha256"] == results[0]
    assert list(cache.iterdir()) == [entry]


def test_the_cache_keeps_a_bounded_number_of_files(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(provenance, "HASHES_KEPT", 3)
    files = []
    for i in range(5):
        f = tmp_path / f"w{i}.pth"
        f.write_bytes(bytes([i]) * 100)
        files.append(f)
        provenance.file_sha256(f)
    assert len(list(cache.glob("*.json"))) == 3


def test_a_run_reads_its_weights_file_once(tmp_path, cache, reads):
    # The settings hash and loading the weights share one identity: the file is hashed once.
    import torch

    from featx.extract.describer import make_describer
    from tests.net.test_speed_paths import tiny_net

    f = tmp_path / "tiny.pth"
    torch.save(tiny_net().state_dict(), f)
    config = ExtractConfig(model="vgg11", weights=str(f), scales=(32,), layer="pool5")
    provenance.descriptor_hash(config)
    with pytest.raises(BadInput, match="does not fit vgg11"):  # loaded after it was identified
        make_describer(config, "cpu")
    assert reads == [f]


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_a_weights_file_loads_mapped_or_read_whole(tmp_path, zipfile):
    # torch.save's zip format is mapped (read as the net is lowered); a legacy file is read whole.
    import torch

    from tests.net.test_speed_paths import tiny_net

    state = tiny_net().state_dict()
    f = tmp_path / "w.pth"
    torch.save(state, f, _use_new_zipfile_serialization=zipfile)
    loaded = net_weights.resolve("vgg11", str(f)).state_dict
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
