"""The writer: places each unit's bytes at its precomputed offset in the output shards.

Shards are written as `<name>.partial`, preallocated to their final size with their
header in place; they are renamed to their final names only by `finalize`, after every
byte range has been written. The class is plain Python; `engine/writer.py` runs it as
a Ray actor on the node that holds the output directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from distmerge.errors import MergeFailed, out_of_space
from distmerge.io import checksum
from distmerge.io.layout import PARTIAL_SUFFIX, OutputLayout
from distmerge.output.resume import ProgressLog
from distmerge.memory import peak_rss


class ShardWriter:
    def __init__(self, out_dir: str, layout: OutputLayout, storage: object = None, part_size: int = 0,
                 resume: Optional[List[int]] = None) -> None:
        """Open the shards: fresh (truncated, header written), or as left by an interrupted
        run when `resume` (data bytes already written per shard) is given.

        `storage` and `part_size` are unused here; they keep one constructor for every writer.
        """
        self.out_dir = out_dir
        self.layout = layout
        self.fds: List[int] = []
        self.written = list(resume) if resume is not None else [0] * len(layout.shards)
        self.progress = ProgressLog(out_dir)
        for shard in layout.shards:
            path = os.path.join(out_dir, shard.file_name + PARTIAL_SUFFIX)
            if resume is not None:
                fd = os.open(path, os.O_RDWR)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(fd, shard.size)
            os.pwrite(fd, shard.header, 0)  # resumed too: no unit logged means no header synced
            self.fds.append(fd)

    def write(self, segments: Sequence[Tuple[int, int, int]], data: np.ndarray, unit: int = -1) -> int:
        """Write `data` split into (shard, file offset, length) segments, in order; log `unit` as done."""
        with space_errors(self.out_dir):
            return self._write(segments, data, unit)

    def _write(self, segments: Sequence[Tuple[int, int, int]], data: np.ndarray, unit: int) -> int:
        view = memoryview(data).cast("B")
        position = 0
        for shard, offset, length in segments:
            chunk = view[position:position + length]
            done = 0
            while done < length:
                done += os.pwrite(self.fds[shard], chunk[done:], offset + done)
            self.written[shard] += length
            position += length
        if unit >= 0:
            self.progress.add(unit, self.fds)
        return position

    def finalize(self) -> Dict[str, object]:
        """Check every shard is complete, checksum and sync it, and give it its final name."""
        with space_errors(self.out_dir):
            return self._finalize()

    def _finalize(self) -> Dict[str, object]:
        checksums = {}
        for i, shard in enumerate(self.layout.shards):
            expected = shard.size - len(shard.header)
            if self.written[i] != expected:
                raise MergeFailed(f"{shard.file_name}: {self.written[i]} of {expected} data bytes were written")
            fd = self.fds[i]
            checksums[shard.file_name] = checksum.checksum_of(
                lambda a, b, fd=fd: os.pread(fd, b - a, a), shard.size, checksum.LOCAL_BLOCK)
        self.progress.flush(self.fds)  # so a crash among the renames below still resumes
        for fd in self.fds:
            os.fsync(fd)
            os.close(fd)
        self.fds = []
        for shard in self.layout.shards:
            final = os.path.join(self.out_dir, shard.file_name)
            os.replace(final + PARTIAL_SUFFIX, final)
        sync_directory(self.out_dir)
        return {"bytes_written": sum(s.size for s in self.layout.shards), "peak_rss": peak_rss(),
                "checksums": checksums, "checksum_algorithm": checksum.describe(checksum.LOCAL_BLOCK)}

    def interrupted(self) -> None:
        """Log what is synced and close, keeping the partial shards for a resume."""
        self.progress.flush(self.fds)
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def process_id(self) -> int:
        return os.getpid()


@contextlib.contextmanager
def space_errors(where: str) -> Iterator[None]:
    """A full filesystem (or quota) becomes `OutputFull`: the merge keeps what is durable."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise out_of_space(where, err) from err
        raise


def sync_directory(path: str) -> None:
    """Make renames in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
