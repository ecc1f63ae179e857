"""The writer: places each unit's bytes at its precomputed offset in the output shards.

Shards are written as `<name>.partial`, preallocated to their final size with their
header in place; they are renamed to their final names only by `finalize`, after every
byte range has been written. Each checksum block is hashed as soon as it is whole. The
class is plain Python; `engine/writer.py` runs it as a Ray actor on the node that holds
the output directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
from concurrent.futures import Future, ThreadPoolExecutor
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
        # Each checksum block is hashed, on a thread of its own, once all its bytes are
        # written by this writer, so that the commit need not read the shards back; a
        # block partly written before a resume is hashed at the commit.
        self.blocks = BlockHasher(layout, checksum.LOCAL_BLOCK)
        for shard in layout.shards:
            path = os.path.join(out_dir, shard.file_name + PARTIAL_SUFFIX)
            if resume is not None:
                fd = os.open(path, os.O_RDWR)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(fd, shard.size)
            os.pwrite(fd, shard.header, 0)  # resumed too: no unit logged means no header synced
            self.fds.append(fd)
        for i, shard in enumerate(layout.shards):
            self.blocks.written(i, 0, len(shard.header), self.fds[i])

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
            self.blocks.written(shard, offset, length, self.fds[shard])
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
            checksums[shard.file_name] = self.blocks.checksum(i, lambda a, b, fd=fd: os.pread(fd, b - a, a))
        self.blocks.close()
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
        self.blocks.close()
        self.progress.flush(self.fds)
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def process_id(self) -> int:
        return os.getpid()


class BlockHasher:
    """The block digests of `checksum` for shards written out of order: a block is hashed
    (read back from the page cache, on a background thread) once every byte of it has been
    written; a block written more than once, or never seen whole, is hashed at the end."""

    def __init__(self, layout: OutputLayout, block_size: int) -> None:
        self.block_size = block_size
        self.sizes = [shard.size for shard in layout.shards]
        self.filled = [[0] * max(1, -(-size // block_size)) for size in self.sizes]
        self.digests: List[Dict[int, Future]] = [{} for _ in self.sizes]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="block-hasher")

    def _length(self, shard: int, block: int) -> int:
        return min(self.block_size, self.sizes[shard] - block * self.block_size)

    def written(self, shard: int, offset: int, length: int, fd: int) -> None:
        end = offset + length
        for block in range(offset // self.block_size, -(-end // self.block_size)):
            start, size = block * self.block_size, self._length(shard, block)
            self.filled[shard][block] += min(end, start + size) - max(offset, start)
            if self.filled[shard][block] == size:
                self.digests[shard][block] = self.pool.submit(
                    lambda fd=fd, a=start, n=size: checksum.block_digest(os.pread(fd, n, a)))
            elif self.filled[shard][block] > size:
                self.digests[shard].pop(block, None)  # written twice: hashed at the end

    def checksum(self, shard: int, read) -> str:
        """The shard's checksum: the digests computed so far, the missing ones now."""
        digests = []
        for block in range(len(self.filled[shard])):
            future = self.digests[shard].get(block)
            start = block * self.block_size
            digests.append(future.result() if future is not None else
                           checksum.block_digest(read(start, start + self._length(shard, block))))
        return checksum.combine(digests)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


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
