"""Byte-range reads of remote objects: concurrent ranged GETs, pinned to one version.

S3 reads carry `If-Match: <ETag from the plan>`, so an object replaced mid-merge fails
with a clear error instead of mixing versions. They go through distmerge's direct client
(`io.s3_direct`, which retries within s3fs's and botocore's budget) where it serves the
storage options, else through s3fs's client: failed requests are retried by s3fs and
botocore (bounded; see `Storage.filesystem`), and a response body cut off mid-transfer,
which neither retries, is fetched again here (`BODY_ATTEMPTS`). Other fsspec protocols
use the filesystem's own concurrent `cat_ranges`, with the object's size and version
checked before and after. Requests for adjacent bytes of one object (consecutive
tensors of a safetensors file) are fetched as one span: fewer, larger GETs cost less CPU
on both ends and fewer round trips. Reads land in one preallocated buffer per span: S3
response bodies are read straight into it, and it is not zero-filled first.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import List, Sequence, Tuple

import numpy as np

from distmerge.errors import InputError
from distmerge.io.s3_direct import backoff, short_read, split_bucket, unranged_answer
from distmerge.io.storage import Storage, s3_error_code, split_url

CHUNK_BYTES = 8 * 2**20
CONCURRENT_REQUESTS = 8
BODY_ATTEMPTS = 5
TRANSIENT_ERRORS = {"ClientPayloadError", "ClientConnectionError", "ServerDisconnectedError", "IncompleteRead",
                    "IncompleteReadError",
                    "ConnectionError", "TimeoutError", "ReadTimeoutError", "ResponseStreamingError",
                    "ConnectionClosedError", "ProtocolError"}


def _chunks(start: int, end: int) -> List[Tuple[int, int]]:
    return [(a, min(end, a + CHUNK_BYTES)) for a in range(start, end, CHUNK_BYTES)]


def _transient(err: BaseException) -> bool:
    """A dropped or cut-off connection (worth another try), by exception type names, so
    that aiohttp/botocore internals need not be imported here."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & TRANSIENT_ERRORS)


def _read_error(url: str, a: int, b: int, err: BaseException) -> InputError:
    if s3_error_code(err) == "PreconditionFailed":
        return changed_error(url)
    if isinstance(err, FileNotFoundError):
        return InputError(f"{url}: disappeared during the merge")
    return InputError(f"{url}: reading bytes {a}-{b} failed: {type(err).__name__}: {err}")


def changed_error(url: str) -> InputError:
    return InputError(f"{url}: changed since the merge was planned (its ETag/version differs); "
                      "re-run the merge on a stable input")


def _buffer(size: int) -> memoryview:
    """`size` writable bytes, not zero-filled (every byte is about to be overwritten)."""
    return memoryview(np.empty(size, dtype=np.uint8))


async def _read_body_into(body, view: memoryview) -> int:
    """Read a response body into `view` chunk by chunk (no whole-body bytes object and
    copy); the number of bytes read, which is short if the body ended early."""
    readinto = getattr(body, "readinto", None)
    if readinto is None:
        data = await body.read()
        view[:len(data)] = data[:len(view)]
        return len(data)
    filled = 0
    while filled < len(view):
        n = await readinto(view[filled:])
        if n == 0:
            break
        filled += n
    return filled


async def _s3_read(fs, requests: Sequence[Tuple[str, int, int, str, memoryview]]) -> None:
    """Fetch every (url, start, end, etag, buffer) request with bounded concurrent GETs."""
    limit = asyncio.Semaphore(CONCURRENT_REQUESTS)

    async def one(url: str, bucket: str, key: str, etag: str, view: memoryview, offset: int, a: int, b: int):
        kwargs = dict(Bucket=bucket, Key=key, Range=f"bytes={a}-{b - 1}")
        if etag:
            kwargs["IfMatch"] = etag
        for attempt in range(BODY_ATTEMPTS):
            async with limit:
                try:  # the request itself is retried by s3fs and botocore (bounded)
                    response = await fs._call_s3("get_object", **kwargs)
                except Exception as err:  # noqa: BLE001 - mapped to an error naming the object
                    raise _read_error(url, a, b, err) from None
                length = response.get("ContentLength")
                if length is not None and length != b - a:  # e.g. a server that ignores Range
                    response["Body"].close()
                    raise unranged_answer(url, a, b, f"{length} bytes")
                try:  # a body cut off mid-transfer is retried here, with backoff
                    got = await _read_body_into(response["Body"], view[a - offset:b - offset])
                except Exception as err:  # noqa: BLE001
                    if not _transient(err) or attempt + 1 == BODY_ATTEMPTS:
                        raise InputError(f"{url}: reading bytes {a}-{b} failed {attempt + 1} time(s), last: "
                                         f"{type(err).__name__}: {err}") from None
                    got = None
            if got is None:
                await asyncio.sleep(backoff(attempt))
                continue
            if got != b - a:
                raise short_read(url, a, b, got)
            return

    jobs = []
    for url, start, end, etag, view in requests:
        bucket, key, _ = fs.split_path(url)
        jobs += [one(url, bucket, key, etag, view, start, a, b) for a, b in _chunks(start, end)]
    await asyncio.gather(*jobs)


def _direct_read(client, requests: Sequence[Tuple[str, int, int, str, memoryview]]) -> None:
    """Fetch every (url, start, end, etag, buffer) request with `io.s3_direct`, in chunks of
    at most CHUNK_BYTES, CONCURRENT_REQUESTS at a time (threads of this call: http.client
    lets go of the GIL while it waits); retries are the client's. The first failure stops
    the other chunks (between their attempts) and is the one reported."""
    from distmerge.io.s3_direct import Cancelled

    cancel = threading.Event()

    def one(url: str, etag: str, view: memoryview, offset: int, a: int, b: int) -> None:
        try:
            client.read_into(*split_bucket(url), a, view[a - offset:b - offset], etag, cancel=cancel)
        except (InputError, Cancelled):
            raise
        except Exception as err:  # noqa: BLE001 - mapped to an error naming the object
            raise _read_error(url, a, b, err) from err

    chunks = [(url, etag, view, start, a, b)
              for url, start, end, etag, view in requests for a, b in _chunks(start, end)]
    with ThreadPoolExecutor(min(CONCURRENT_REQUESTS, len(chunks)), thread_name_prefix="s3-get") as pool:
        jobs = [pool.submit(one, *chunk) for chunk in chunks]
        try:
            done, _ = wait(jobs, return_when=FIRST_EXCEPTION)
            failed = next((job for job in jobs if job in done and job.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
        finally:  # a failure, or an interrupt of this thread: the rest stop (the pool waits for running ones)
            if not all(job.done() for job in jobs):
                cancel.set()
                for job in jobs:
                    job.cancel()


Request = Tuple[str, int, int, str]  # (url, start, end, version)


def coalesce(requests: Sequence[Request]) -> Tuple[List[Request], List[Tuple[int, int]]]:
    """Merge requests for adjacent bytes of one object (same url and version) into spans:
    (the spans, and for each request its span and its offset in the span's bytes)."""
    spans: List[List] = []
    where: List[Tuple[int, int]] = [(0, 0)] * len(requests)
    ends: dict = {}  # (url, version, end) -> the span ending there
    for i in sorted(range(len(requests)), key=lambda i: (requests[i][0], requests[i][3], requests[i][1])):
        url, start, end, version = requests[i]
        s = ends.pop((url, version, start), None)
        if s is None:
            s = len(spans)
            spans.append([url, start, start, version])
        where[i] = (s, start - spans[s][1])
        spans[s][2] = max(spans[s][2], end)
        ends[(url, version, spans[s][2])] = s
    return [tuple(s) for s in spans], where


def read_remote_many(storage: Storage, requests: Sequence[Request]) -> List[memoryview]:
    """Bytes [start, end) of each (url, start, end, version), fetched concurrently, as
    writable byte buffers (views of one buffer where requests were adjacent).

    `version` is the ETag (or mtime) recorded when the merge was planned.
    """
    spans, where = coalesce(requests)
    fetched = _read_spans(storage, spans)
    return [fetched[s][offset:offset + end - start] for (s, offset), (_, start, end, _) in zip(where, requests)]


def _read_spans(storage: Storage, requests: Sequence[Request]) -> List[memoryview]:
    buffers = [_buffer(end - start) for _, start, end, _ in requests]
    s3_requests = [(u, a, b, v, buf) for (u, a, b, v), buf in zip(requests, buffers)
                   if b > a and split_url(u)[0] == "s3"]
    direct, through_s3fs = [], []
    for request in s3_requests:
        (direct if storage.direct_s3_for(request[0]) is not None else through_s3fs).append(request)
    if direct:
        _direct_read(storage.direct_s3(), direct)
    if through_s3fs:
        from fsspec.asyn import sync

        fs = storage.filesystem(through_s3fs[0][0])
        sync(fs.loop, _s3_read, fs, through_s3fs)
    for (url, start, end, version), buffer in zip(requests, buffers):
        if end > start and split_url(url)[0] != "s3":
            buffer[:] = _read_generic(storage, url, start, end, version)
    return buffers


def _read_generic(storage: Storage, url: str, start: int, end: int, version: str) -> memoryview:
    """Any other fsspec protocol: its own concurrent cat_ranges, version checked around it."""
    from distmerge.io.checkpoint import file_version

    fs = storage.filesystem(url)
    if version and file_version(fs.info(url)) != version:
        raise changed_error(url)
    ranges = _chunks(start, end)
    parts = fs.cat_ranges([url] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges])
    buffer = _buffer(end - start)
    for (a, b), data in zip(ranges, parts):
        if len(data) != b - a:
            raise short_read(url, a, b, len(data))
        buffer[a - start:b - start] = data
    if version and file_version(fs.info(url)) != version:
        raise changed_error(url)
    return buffer
