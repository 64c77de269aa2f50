"""`--shard K/N`: a stable split of the file list by path hash, so N machines share a folder.

An image's shard depends on its recorded path alone (not on the position in the list), so
adding or removing files never moves the other files to another shard, and each machine's
output can be resumed and merged on its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TypeVar

from featx.errors import BadInput

T = TypeVar("T")


def parse_shard(text: str) -> tuple[int, int]:
    """ "K/N" -> (K, N) with 0 <= K < N, numbered from 0 like ranks (SLURM_PROCID, RANK)."""
    k_text, sep, n_text = str(text).replace(" ", "").partition("/")
    try:
        k, n = int(k_text), int(n_text)
    except ValueError:
        k = n = -1
    if not sep or n < 1 or not 0 <= k < n:
        raise BadInput(f"--shard {text!r} is not K/N with 0 <= K < N; write e.g. --shard 0/4 ... --shard 3/4")
    return k, n


def shard_of(path: str, n: int) -> int:
    """The shard (0..n-1) of a recorded path; the same on every machine and Python process.

    Python's hash() is salted per process, so a cryptographic hash of the UTF-8 path is used.
    """
    digest = hashlib.blake2b(path.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def shard(items: Iterable[T], k: int, n: int) -> list[T]:
    """The items of shard K of N, in their given order; items are paths or have a `.path`."""
    if n < 1 or not 0 <= k < n:
        raise BadInput(f"shard {k}/{n} is not K/N with 0 <= K < N; write e.g. 0/{max(n, 1)}")
    return [it for it in items if shard_of(it if isinstance(it, str) else it.path, n) == k]


def take_shard(items: list[T], spec: str | tuple[int, int]) -> list[T]:
    """The items of `--shard K/N` ("K/N" or (K, N)); an empty shard is a user error."""
    k, n = parse_shard(spec) if isinstance(spec, str) else spec
    chosen = shard(items, k, n)
    if not chosen:
        raise BadInput(f"--shard {k}/{n} holds none of the {len(items)} images; use fewer shards (a smaller N)")
    return chosen
