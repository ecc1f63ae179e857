"""Shard checksums that out-of-order writers can compute: a hash tree over fixed blocks.

checksum = sha256( sha256(block 0) || sha256(block 1) || ... ), blocks of `block_size`
bytes (the last shorter). The S3 writer hashes each multipart part as it uploads it
(block = part), the local writer hashes each block once all of it is written (a resumed
one reads its shards back at the commit).
The algorithm and block size are recorded next to the checksums in the index metadata.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable

ALGORITHM = "sha256-blocks"
LOCAL_BLOCK = 16 * 2**20  # = the default S3 part size, so both write the same index by default


def combine(block_digests: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for digest in block_digests:
        h.update(digest)
    return h.hexdigest()


def block_digest(data) -> bytes:
    return hashlib.sha256(data).digest()


def checksum_of(read: Callable[[int, int], bytes], size: int, block_size: int) -> str:
    """The checksum of `size` bytes read through `read(start, end)`."""
    starts = range(0, size, block_size) or [0]  # an empty file is one empty block
    return combine(block_digest(read(a, min(size, a + block_size))) for a in starts)


def describe(block_size: int) -> str:
    return f"{ALGORITHM}-{block_size}"


def parse(description: str) -> int:
    """Block size from a recorded algorithm description; ValueError if unknown."""
    name, _, block = description.rpartition("-")
    if name != ALGORITHM or not block.isdigit():
        raise ValueError(f"unknown checksum algorithm {description!r}")
    return int(block)
