"""`distmerge verify`: check a checkpoint against its index, and optionally against another.

Checks: the index parses and names only shards inside the checkpoint; every shard
exists and has a valid header; every tensor of the weight_map is in the shard it names
(and no shard holds tensors the index does not list); tensors fill each shard's data
exactly (no holes, no overlaps, no trailing bytes); metadata.total_size is right; the
per-shard checksums recorded by the merge match. With `against`, every tensor must be
bit-identical (same names, dtypes, shapes and bytes) to the other checkpoint's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import List

from distmerge.errors import InputError
from distmerge.io import checksum
from distmerge.io.checkpoint import INDEX_NAME, ModelFiles, _shard_names_from_index, open_checkpoint
from distmerge.io.header import read_header
from distmerge.io.storage import LOCAL, Storage

COMPARE_BLOCK = 16 * 2**20


@dataclass
class VerifyReport:
    checkpoint: str
    problems: List[str] = field(default_factory=list)
    tensors: int = 0
    shards: int = 0
    checksums_checked: int = 0
    compared_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"{'PASS' if self.ok else 'FAIL'}: {self.checkpoint}: {self.tensors} tensors in {self.shards} "
                 f"shard(s), {self.checksums_checked} checksum(s) checked"
                 + (f", {self.compared_bytes} bytes compared" if self.compared_bytes else "")]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def verify_checkpoint(path: str, against: str = None, storage: Storage = LOCAL) -> VerifyReport:
    report = VerifyReport(path)
    files = ModelFiles(path, storage)
    index_url = files.url(INDEX_NAME)
    try:
        raw = files.read(index_url)
        index = json.loads(raw)
        weight_map = _shard_names_from_index(index_url, raw)
    except (InputError, ValueError) as err:
        report.problems.append(str(err))
        return report
    metadata = index.get("metadata") or {}
    shards = sorted(set(weight_map.values()))
    report.shards = len(shards)
    total = 0
    recorded = metadata.get("distmerge_checksums") or {}
    block = None
    if recorded:
        try:
            block = checksum.parse(metadata.get("distmerge_checksum_algorithm", ""))
        except ValueError as err:
            report.problems.append(f"{INDEX_NAME}: {err}")
    for shard in shards:
        url = files.url(shard)
        try:
            size = int(files.info(url).get("size") or 0)
            header = read_header(lambda a, b: files.read(url, a, b), url, size)
        except InputError as err:
            report.problems.append(str(err))
            continue
        listed = {name for name, s in weight_map.items() if s == shard}
        for name in sorted(listed - set(header)):
            report.problems.append(f"{shard}: tensor {name!r} is in the index but not in the shard")
        for name in sorted(set(header) - listed):
            report.problems.append(f"{shard}: tensor {name!r} is in the shard but the index does not list it")
        data_start = min((t.start for t in header.values()), default=size)
        covered = sum(t.nbytes for t in header.values())
        if data_start + covered != size:
            report.problems.append(f"{shard}: tensors cover {covered} bytes but the data section is "
                                   f"{size - data_start} bytes (holes or trailing bytes)")
        total += covered
        report.tensors += len(header)
        if shard in recorded and block:
            actual = checksum.checksum_of(lambda a, b: files.read(url, a, b), size, block)
            report.checksums_checked += 1
            if actual != recorded[shard]:
                report.problems.append(f"{shard}: checksum {actual[:16]}... differs from the recorded "
                                       f"{recorded[shard][:16]}...")
        elif recorded:
            report.problems.append(f"{shard}: no checksum recorded for it")
    if metadata.get("total_size") not in (None, total):
        report.problems.append(f"{INDEX_NAME}: metadata.total_size is {metadata['total_size']}, tensors hold {total}")
    if against and report.ok:
        _compare(report, path, against, storage)
    return report


def _compare(report: VerifyReport, path: str, other: str, storage: Storage) -> None:
    try:
        mine, theirs = open_checkpoint(path, path, storage), open_checkpoint(other, other, storage)
    except InputError as err:
        report.problems.append(str(err))
        return
    for name in sorted(set(mine.tensors) ^ set(theirs.tensors)):
        where = path if name in mine.tensors else other
        report.problems.append(f"tensor {name!r} is only in {where}")
    reader_a, reader_b = ModelFiles(path, storage), ModelFiles(other, storage)
    for name in sorted(set(mine.tensors) & set(theirs.tensors)):
        a, b = mine.tensors[name], theirs.tensors[name]
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            report.problems.append(f"tensor {name!r}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
            continue
        for offset in range(0, a.nbytes, COMPARE_BLOCK):
            n = min(COMPARE_BLOCK, a.nbytes - offset)
            if reader_a.read(a.path, a.start + offset, a.start + offset + n) != \
                    reader_b.read(b.path, b.start + offset, b.start + offset + n):
                report.problems.append(f"tensor {name!r} differs (first in bytes {offset}..{offset + n})")
                break
            report.compared_bytes += n
