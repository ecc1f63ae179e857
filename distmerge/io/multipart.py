"""Writing output shards to S3 as multipart uploads, parts uploaded as they fill.

Each shard is one multipart upload. Shard bytes are cut into fixed-size parts
(`part_size`, at least 5 MiB as S3 requires, the last part shorter); results arrive
at arbitrary offsets, fill their parts' buffers, and a part is uploaded (in a small
thread pool, in whatever order parts complete) as soon as it is full. A shard becomes
an object only when `finalize` completes its upload after every part is in; `abort`
(or any failure) aborts every upload, so no orphaned parts and no object remain.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Sequence, Tuple

import numpy as np

from distmerge.errors import MergeFailed
from distmerge.io import checksum
from distmerge.io.layout import OutputLayout
from distmerge.io.storage import Storage, join
from distmerge.memory import peak_rss

MIN_PART_SIZE = 5 * 2**20
DEFAULT_PART_SIZE = 64 * 2**20
UPLOAD_THREADS = 4


def abort_uploads_under(fs, url: str) -> int:
    """Abort every unfinished multipart upload under the prefix `url`; return how many."""
    bucket, prefix, _ = fs.split_path(url)
    aborted = 0
    response = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    for upload in response.get("Uploads", []):
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        aborted += 1
    return aborted


class MultipartShardWriter:
    def __init__(self, out_url: str, layout: OutputLayout, storage: Storage, part_size: int = DEFAULT_PART_SIZE,
                 resumed_bytes: None = None) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part size {part_size} is below S3's 5 MiB minimum")
        self.fs = storage.filesystem(out_url)
        self.layout = layout
        self.part_size = part_size
        self.keys: List[Tuple[str, str]] = []
        self.upload_ids: List[str] = []
        self.buffers: Dict[Tuple[int, int], bytearray] = {}
        self.filled: Dict[Tuple[int, int], int] = {}
        self.etags: Dict[Tuple[int, int], str] = {}
        self.digests: Dict[Tuple[int, int], bytes] = {}
        self.futures: List[Future] = []
        self.pool = ThreadPoolExecutor(UPLOAD_THREADS)
        try:
            for shard in layout.shards:
                bucket, key, _ = self.fs.split_path(join(out_url, shard.file_name))
                response = self.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
                self.keys.append((bucket, key))
                self.upload_ids.append(response["UploadId"])
            for i, shard in enumerate(layout.shards):
                self._put(i, 0, memoryview(shard.header))
        except BaseException:
            self.abort()
            raise

    def _parts(self, shard: int) -> int:
        size = self.layout.shards[shard].size
        return max(1, -(-size // self.part_size))

    def _part_length(self, shard: int, part: int) -> int:
        size = self.layout.shards[shard].size
        return min(self.part_size, size - part * self.part_size)

    def _put(self, shard: int, offset: int, data: memoryview) -> None:
        while len(data):
            part = offset // self.part_size
            part_start = part * self.part_size
            length = self._part_length(shard, part)
            buffer = self.buffers.setdefault((shard, part), bytearray(length))
            n = min(len(data), part_start + length - offset)
            buffer[offset - part_start:offset - part_start + n] = data[:n]
            self.filled[(shard, part)] = self.filled.get((shard, part), 0) + n
            if self.filled[(shard, part)] == length:
                self.futures.append(self.pool.submit(self._upload, shard, part, self.buffers.pop((shard, part))))
            offset += n
            data = data[n:]

    def _upload(self, shard: int, part: int, body: bytearray) -> None:
        self.digests[(shard, part)] = checksum.block_digest(body)
        bucket, key = self.keys[shard]
        response = self.fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=self.upload_ids[shard],
                                   PartNumber=part + 1, Body=bytes(body))
        self.etags[(shard, part)] = response["ETag"]

    def write(self, segments: Sequence[Tuple[int, int, int]], data: np.ndarray, unit: int = -1) -> int:
        view = memoryview(data).cast("B")
        position = 0
        for shard, offset, length in segments:
            self._put(shard, offset, view[position:position + length])
            position += length
        self._raise_upload_errors(wait=False)
        return position

    def _raise_upload_errors(self, wait: bool) -> None:
        pending = []
        for future in self.futures:
            if wait or future.done():
                future.result()
            else:
                pending.append(future)
        self.futures = pending

    def finalize(self) -> Dict[str, int]:
        self._raise_upload_errors(wait=True)
        for i, shard in enumerate(self.layout.shards):
            missing = [p + 1 for p in range(self._parts(i)) if (i, p) not in self.etags]
            if missing:
                raise MergeFailed(f"{shard.file_name}: parts {missing[:5]} were never completed")
        for i, (bucket, key) in enumerate(self.keys):
            parts = [{"PartNumber": p + 1, "ETag": self.etags[(i, p)]} for p in range(self._parts(i))]
            self.fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=self.upload_ids[i],
                            MultipartUpload={"Parts": parts})
        self.pool.shutdown()
        checksums = {shard.file_name: checksum.combine(self.digests[(i, p)] for p in range(self._parts(i)))
                     for i, shard in enumerate(self.layout.shards)}
        return {"bytes_written": sum(s.size for s in self.layout.shards), "peak_rss": peak_rss(),
                "checksums": checksums, "checksum_algorithm": checksum.describe(self.part_size)}

    def interrupted(self) -> None:
        """S3 outputs do not resume yet: an interrupted merge aborts its uploads."""
        self.abort()

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for (bucket, key), upload_id in zip(self.keys, self.upload_ids):
            try:
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - abort the others anyway
                pass
        self.buffers.clear()

