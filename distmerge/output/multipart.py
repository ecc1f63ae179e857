"""Writing output shards to S3 as multipart uploads, parts uploaded as they fill.

Each shard is one multipart upload. Shard bytes are cut into fixed-size parts
(`part_size`, 5 MiB to 5 GiB as S3 requires, the last part shorter, at most 10,000 per
shard); results arrive at arbitrary offsets, fill their parts' buffers, and a part is
uploaded (in a small thread pool, in whatever order parts complete) as soon as it is
full. A shard becomes an object only when `finalize` completes its upload after every
part is in; `abort` (any failure) aborts every upload, so no orphaned parts remain.

Resume state lives under the output prefix: the in-progress uploads and their parts,
plus one empty marker object per uploaded part,
`.distmerge-parts/<shard>/<part>-<hex of etag>-<sha256>`, written after the part's
upload succeeded, and `.distmerge-parts/<shard>/complete-<hex of etag>` once S3 has
completed the shard. A failed merge is cleaned up by `Destination.discard`. A part
marker carries the part's SHA-256 (for the index checksums; S3 cannot return part bytes
before completion) and its ETag ties it to the very part S3 holds. A part counts as done
only when S3 lists it with a marker's ETag and the expected size; everything else is
uploaded again.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

from distmerge.errors import MergeFailed, OutputError
from distmerge.io import checksum
from distmerge.io.layout import SHARD_FILE, OutputLayout
from distmerge.output.resume import MANIFEST
from distmerge.io.storage import Storage, join
from distmerge.memory import peak_rss

MIN_PART_SIZE = 5 * 2**20
MAX_PART_SIZE = 5 * 2**30
MAX_PARTS = 10_000
# 16 MiB (AWS's CLI uses 8 MB): a part is uploaded as soon as it fills, so smaller parts
# overlap the uploads with the merge and leave less to upload after the last unit.
DEFAULT_PART_SIZE = 16 * 2**20
UPLOAD_THREADS = 16  # parts uploaded at once (one S3 connection each)
# Parts filled but not yet uploaded, at most: past this, `write` waits for uploads, which holds
# the driver back (its writes are acknowledged later), so the writer's memory stays bounded
# (about (UPLOAD_THREADS + MAX_QUEUED_PARTS) x part size) however slow the uploads are.
MAX_QUEUED_PARTS = 8
MARKERS = ".distmerge-parts"


def bucket_and_prefix(fs, url: str) -> Tuple[str, str]:
    """("bucket", "some/prefix/") for s3://bucket/some/prefix; ("bucket", "") at a bucket root."""
    bucket, path, _ = fs.split_path(url)
    return bucket, (path.strip("/") + "/" if path.strip("/") else "")


def part_count(size: int, part_size: int) -> int:
    return max(1, -(-size // part_size))


def part_range(size: int, part_size: int, part: int) -> Tuple[int, int]:
    """The bytes [start, end) of part index `part` in a shard of `size` bytes."""
    return part * part_size, min(size, (part + 1) * part_size)


def check_part_size(layout: OutputLayout, part_size: int) -> None:
    """Refuse part sizes S3 will not take, before anything is uploaded."""
    if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
        raise OutputError(f"--part-size {part_size} bytes is outside S3's limits (5 MiB to 5 GiB)")
    for shard in layout.shards:
        if part_count(shard.size, part_size) > MAX_PARTS:
            need = -(-shard.size // MAX_PARTS)
            raise OutputError(f"{shard.file_name} ({shard.size} bytes) would need more than {MAX_PARTS} parts of "
                              f"{part_size} bytes; pass --part-size {max(need, MIN_PART_SIZE)} or more, "
                              "or a smaller --shard-size")


def _pages(fs, method: str, items: str, cursor: Dict[str, str], **request) -> Iterator[dict]:
    """Every item of a paginated S3 listing; `cursor` maps request keys to response keys."""
    while True:
        response = fs.call_s3(method, **request)
        yield from response.get(items, [])
        following = {ask: response.get(answer) for ask, answer in cursor.items()}
        if not response.get("IsTruncated") or all(request.get(k) == v for k, v in following.items()):
            return  # the last page (or a store that says truncated but does not move on)
        request.update({k: v for k, v in following.items() if v is not None})


def shard_uploads(fs, url: str) -> List[Tuple[str, str]]:
    """(key, upload id) of the unfinished uploads of shard files directly under `url`.

    Only keys named like our shards count: other uploads under the prefix (or, at a
    bucket root, anywhere in the bucket) belong to someone else and are never touched.
    """
    bucket, prefix = bucket_and_prefix(fs, url)
    pages = _pages(fs, "list_multipart_uploads", "Uploads",
                   {"KeyMarker": "NextKeyMarker", "UploadIdMarker": "NextUploadIdMarker"},
                   Bucket=bucket, Prefix=prefix)
    return [(u["Key"], u["UploadId"]) for u in pages
            if u["Key"].startswith(prefix) and SHARD_FILE.fullmatch(u["Key"][len(prefix):])]


def abort_shard_uploads(fs, url: str) -> None:
    """Abort the unfinished shard uploads under `url` (see `shard_uploads`)."""
    bucket, _ = bucket_and_prefix(fs, url)
    for key, upload_id in shard_uploads(fs, url):
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)


def remove_resume_state(fs, url: str) -> None:
    """Delete the part markers and the manifest (after a commit, a failure, or to restart)."""
    fs.invalidate_cache()
    markers = fs.find(join(url, MARKERS))
    if markers:
        fs.rm(markers)
    try:
        fs.rm_file(join(url, MANIFEST))
    except FileNotFoundError:
        pass


def multipart_etag(part_etags: Sequence[str]) -> Optional[str]:
    """The ETag S3 gives an object completed from parts with these ETags, when the part
    ETags are MD5s (unencrypted or SSE-S3); None when they are not."""
    try:
        joined = b"".join(bytes.fromhex(e.strip('"')) for e in part_etags)
    except ValueError:
        return None
    return f"{hashlib.md5(joined).hexdigest()}-{len(part_etags)}"


def _etag_field(etag: str) -> str:
    """An ETag as a marker-name field: hex of its text (ETags may hold '-', '/', ...)."""
    return etag.strip('"').encode().hex()


@dataclass
class ShardUpload:
    """What S3 holds of one shard: its upload and the parts done, or the completed object."""

    upload_id: Optional[str] = None
    parts: Dict[int, Tuple[str, bytes]] = field(default_factory=dict)  # part index -> (ETag, sha256)
    complete: bool = False


@dataclass
class _Markers:
    parts: Dict[int, List[Tuple[str, bytes]]] = field(default_factory=dict)  # part -> [(ETag, sha256)]
    completed: Set[str] = field(default_factory=set)  # ETags S3 gave the completed object


def _read_markers(fs, url: str) -> Dict[str, _Markers]:
    found: Dict[str, _Markers] = {}
    for path in fs.find(join(url, MARKERS)):
        shard_name, leaf = path.split("/")[-2:]
        fields = leaf.split("-")
        mine = found.setdefault(shard_name, _Markers())
        try:
            if len(fields) == 2 and fields[0] == "complete":
                mine.completed.add(bytes.fromhex(fields[1]).decode())
            elif len(fields) == 3 and len(fields[2]) == 64:
                entry = (bytes.fromhex(fields[1]).decode(), bytes.fromhex(fields[2]))
                mine.parts.setdefault(int(fields[0]) - 1, []).append(entry)
        except ValueError:
            continue  # not one of ours
    return found


def _completed_object(head: dict, shard_size: int, n_parts: int,
                      markers: _Markers) -> Optional[Dict[int, Tuple[str, bytes]]]:
    """The parts of a completed shard object if it is the one our markers describe, else None.

    Every part must have markers that agree on its SHA-256 (a part uploaded twice holds the
    same bytes: the merge is deterministic), and S3's ETag of the object must be one we
    recorded at completion or the MD5-of-MD5s of the recorded part ETags.
    """
    if head.get("ContentLength") != shard_size:
        return None
    parts = {}
    for p in range(n_parts):
        entries = markers.parts.get(p, [])
        if not entries or len({digest for _, digest in entries}) != 1:
            return None
        parts[p] = entries[0]
    etag = head.get("ETag", "").strip('"')
    if etag in markers.completed or etag == multipart_etag([parts[p][0] for p in range(n_parts)]):
        return parts
    return None


def recover_uploads(fs, url: str, layout: OutputLayout, part_size: int) -> List[ShardUpload]:
    """What an interrupted merge left under `url`, checked against S3 (see the module doc).

    Of several uploads of one shard (a create request retried after S3 had already acted
    on it) the one with most recorded parts is kept and the others are aborted. A shard
    object that does not match its markers is deleted.
    """
    fs.invalidate_cache()
    bucket, prefix = bucket_and_prefix(fs, url)
    markers = _read_markers(fs, url)
    uploads: Dict[str, List[str]] = {}
    for key, upload_id in shard_uploads(fs, url):
        uploads.setdefault(key, []).append(upload_id)
    states = []
    for shard in layout.shards:
        key = prefix + shard.file_name
        mine = markers.get(shard.file_name, _Markers())
        state = ShardUpload()
        try:
            head = fs.call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            head = None
        if head is not None:
            parts = _completed_object(head, shard.size, part_count(shard.size, part_size), mine)
            if parts is not None:
                state = ShardUpload(parts=parts, complete=True)
            else:
                fs.call_s3("delete_object", Bucket=bucket, Key=key)
        candidates = [] if state.complete else [
            (upload_id, _recorded_parts(fs, bucket, key, upload_id, shard.size, part_size, mine))
            for upload_id in uploads.get(key, [])]
        keep = max(candidates, key=lambda c: len(c[1]), default=None)
        for upload_id in uploads.get(key, []):
            if keep is None or upload_id != keep[0]:
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        if keep is not None:
            state.upload_id, state.parts = keep
        states.append(state)
    return states


def _recorded_parts(fs, bucket: str, key: str, upload_id: str, shard_size: int, part_size: int,
                    markers: _Markers) -> Dict[int, Tuple[str, bytes]]:
    """The parts S3 lists for the upload that a marker records with the same ETag and size."""
    parts = {}
    listed = _pages(fs, "list_parts", "Parts", {"PartNumberMarker": "NextPartNumberMarker"},
                    Bucket=bucket, Key=key, UploadId=upload_id)
    for part in listed:
        p = part["PartNumber"] - 1
        etag = part["ETag"].strip('"')
        start, end = part_range(shard_size, part_size, p)
        if part["Size"] != end - start:
            continue
        for marked_etag, digest in markers.parts.get(p, []):
            if marked_etag == etag:
                parts[p] = (etag, digest)
    return parts


def done_ranges(states: Sequence[ShardUpload], layout: OutputLayout, part_size: int) -> List[List[Tuple[int, int]]]:
    """Per shard, the byte ranges S3 already holds."""
    return [sorted(part_range(shard.size, part_size, p) for p in state.parts)
            for state, shard in zip(states, layout.shards)]


class MultipartShardWriter:
    def __init__(self, out_url: str, layout: OutputLayout, storage: Storage, part_size: int = DEFAULT_PART_SIZE,
                 resume: Optional[List[ShardUpload]] = None) -> None:
        """Start one upload per shard, or carry on with the uploads of an interrupted run.
        `part_size` is checked by `Destination.check` (`check_part_size`)."""
        self.fs = storage.filesystem(out_url)
        self.url = out_url
        self.layout = layout
        self.part_size = part_size
        self.states = resume if resume is not None else [ShardUpload() for _ in layout.shards]
        self.buffers: Dict[Tuple[int, int], bytearray] = {}
        self.filled: Dict[Tuple[int, int], int] = {}
        self.futures: List[Future] = []
        self.pool = ThreadPoolExecutor(UPLOAD_THREADS)
        bucket, prefix = bucket_and_prefix(self.fs, out_url)
        self.keys = [(bucket, prefix + shard.file_name) for shard in layout.shards]
        created = []
        try:
            for (bucket, key), state in zip(self.keys, self.states):
                if state.upload_id is None and not state.complete:
                    state.upload_id = self.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
                    created.append((bucket, key, state.upload_id))
            for i, shard in enumerate(layout.shards):
                self._put(i, 0, memoryview(shard.header))
        except BaseException:
            # Undo only what this start did: a resumed run's uploads and markers stay resumable.
            self.pool.shutdown(wait=True, cancel_futures=True)
            for bucket, key, upload_id in created:
                try:
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
                except Exception:  # noqa: BLE001 - the start-up failure matters more
                    pass
            raise

    def _parts(self, shard: int) -> int:
        return part_count(self.layout.shards[shard].size, self.part_size)

    def _put(self, shard: int, offset: int, data: memoryview) -> None:
        done = self.states[shard].parts
        while len(data):
            part = offset // self.part_size
            part_start, part_end = part_range(self.layout.shards[shard].size, self.part_size, part)
            length = part_end - part_start
            n = min(len(data), part_end - offset)
            if part not in done:  # else S3 holds these bytes already (a resumed run recomputes them)
                buffer = self.buffers.setdefault((shard, part), bytearray(length))
                buffer[offset - part_start:offset - part_start + n] = data[:n]
                self.filled[(shard, part)] = self.filled.get((shard, part), 0) + n
                if self.filled[(shard, part)] == length:
                    del self.filled[(shard, part)]
                    self.futures.append(self.pool.submit(self._upload, shard, part, self.buffers.pop((shard, part))))
            offset += n
            data = data[n:]

    def _upload(self, shard: int, part: int, body: bytearray) -> None:
        digest = checksum.block_digest(body)
        bucket, key = self.keys[shard]
        state = self.states[shard]
        response = self.fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=state.upload_id,
                                   PartNumber=part + 1, Body=bytes(body))
        etag = response["ETag"].strip('"')
        self._mark(shard, f"{part + 1:05d}-{_etag_field(etag)}-{digest.hex()}")
        state.parts[part] = (etag, digest)

    def _mark(self, shard: int, leaf: str) -> None:
        self.fs.pipe_file(join(self.url, MARKERS, self.layout.shards[shard].file_name, leaf), b"")

    def write(self, segments: Sequence[Tuple[int, int, int]], data: np.ndarray, unit: int = -1) -> int:
        view = memoryview(data).cast("B")
        position = 0
        for shard, offset, length in segments:
            self._put(shard, offset, view[position:position + length])
            position += length
        self._raise_upload_errors(wait=False)
        while len(self.futures) > UPLOAD_THREADS + MAX_QUEUED_PARTS:
            self.futures.pop(0).result()
        return position

    def _raise_upload_errors(self, wait: bool) -> None:
        pending = []
        for future in self.futures:
            if wait or future.done():
                future.result()
            else:
                pending.append(future)
        self.futures = pending

    def finalize(self) -> Dict[str, object]:
        self._raise_upload_errors(wait=True)
        for i, shard in enumerate(self.layout.shards):
            missing = [p + 1 for p in range(self._parts(i)) if p not in self.states[i].parts]
            if missing:
                raise MergeFailed(f"{shard.file_name}: parts {missing[:5]} were never completed")
        for i, (bucket, key) in enumerate(self.keys):
            state = self.states[i]
            if state.complete:
                continue
            parts = [{"PartNumber": p + 1, "ETag": f'"{state.parts[p][0]}"'} for p in range(self._parts(i))]
            response = self.fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key,
                                       UploadId=state.upload_id, MultipartUpload={"Parts": parts})
            state.complete = True
            self._mark(i, f"complete-{_etag_field(response['ETag'])}")
        self.pool.shutdown()
        checksums = {shard.file_name: checksum.combine(self.states[i].parts[p][1] for p in range(self._parts(i)))
                     for i, shard in enumerate(self.layout.shards)}
        return {"bytes_written": sum(s.size for s in self.layout.shards), "peak_rss": peak_rss(),
                "checksums": checksums, "checksum_algorithm": checksum.describe(self.part_size)}

    def interrupted(self) -> None:
        """Let running part uploads finish (and leave their markers); keep the uploads for a resume."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.buffers.clear()

    def process_id(self) -> int:
        return os.getpid()
