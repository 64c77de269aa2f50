"""The plan gives freed heap pages back only once resident memory has grown by a margin."""

from __future__ import annotations

from featx.net.plan import heap

MB = 1 << 20


def trimmer_with(monkeypatch, rss_values: list[int]):
    trims: list[int] = []
    values = iter(rss_values)
    monkeypatch.setattr(heap, "glibc_malloc_trim", lambda: trims.append)
    monkeypatch.setattr(heap, "resident_bytes", lambda: next(values))
    return heap.HeapTrimmer(margin_mb=100), trims


def test_trims_only_past_the_margin_over_the_first_batch(monkeypatch):
    # first batch 1000 MB; 1080 (within 100): no trim; 1150: trim, 1020 stays -> next limit 1120
    trim, trims = trimmer_with(
        monkeypatch, [1000 * MB, 1080 * MB, 1150 * MB, 1020 * MB, 1110 * MB, 1130 * MB, 1050 * MB]
    )
    trim()
    trim()
    assert trims == []
    trim()
    assert trims == [0]
    trim()  # 1110 <= the limit (1100 -> raised to 1020 + 100 = 1120)
    assert trims == [0]
    trim()  # 1130 > 1120
    assert trims == [0, 0]


def test_live_memory_that_stays_raises_the_limit(monkeypatch):
    # A trim that frees little (larger images now) must not make every later batch trim.
    trim, trims = trimmer_with(monkeypatch, [1000 * MB, 1500 * MB, 1490 * MB, 1520 * MB, 1560 * MB])
    trim()
    trim()  # 1500 > 1100: trim; 1490 stays -> limit 1590
    trim()  # 1520
    trim()  # 1560
    assert trims == [0]


def test_no_glibc_no_trim(monkeypatch):
    monkeypatch.setattr(heap, "glibc_malloc_trim", lambda: None)
    monkeypatch.setattr(heap, "resident_bytes", lambda: 10**12)
    t = heap.HeapTrimmer(margin_mb=1)
    t(), t()  # nothing to call, nothing raised
    assert t.limit is None


def test_resident_bytes_reads_this_process():
    rss = heap.resident_bytes()
    assert rss is None or 10 * MB < rss < 1 << 40
