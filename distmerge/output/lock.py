"""The output lock: one merge at a time per output, whoever starts it (`merge`, `batch`).

The lock is `.distmerge-lock` inside the output (directory or prefix); it holds who took
it, so a refused merge can say who holds it.

- Local outputs use `flock` on that file: the kernel releases it when the holder's
  process dies, so a crash never leaves the output locked.
- Object storage has no such thing. The lock object is created with a conditional write
  (`If-None-Match: *`: of two writers, exactly one succeeds) and records its time to
  live; the holder rewrites it every quarter of that (`If-Match` on the ETag it wrote, so
  a holder that lost the lock finds out). A lock not rewritten for its time to live, by
  the server's clock (the answer's `Date` less the object's `Last-Modified`, so clock skew
  between machines does not matter), belongs to a crashed holder, and so does one whose
  holder ran in this boot and pid namespace of this machine and has exited. The next
  merge takes it over with a conditional write on the stale object's ETag, so of two
  merges taking over at once exactly one wins.
"""

from __future__ import annotations

import abc
import datetime
import email.utils
import fcntl
import getpass
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional, Tuple

from fsspec.asyn import sync

from distmerge.errors import LockLost, OutputError
from distmerge.io.storage import s3_error_code, split_url
from distmerge.output.destination import Destination

LOCK_NAME = ".distmerge-lock"
DEFAULT_TTL = 300.0  # seconds an object-storage lock lives without being renewed


class OutputLocked(OutputError):
    """Another merge holds the output's lock."""

    def __init__(self, url: str, holder: Dict[str, Any], advice: str) -> None:
        self.holder = holder
        super().__init__(f"output {url} is being merged by {describe_holder(holder)}; {advice}")


def describe_holder(holder: Dict[str, Any]) -> str:
    """'distmerge batch (user@host, pid 123, since 2026-11-30T08:00:00Z)', from what a lock records."""
    who = f"{holder.get('user', '?')}@{holder.get('host', '?')}, pid {holder.get('pid', '?')}"
    since = holder.get("acquired")
    return (f"{holder.get('purpose', 'another merge')} ({who}"
            + (f", since {_iso(since)}" if isinstance(since, (int, float)) else "") + ")")


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _holder_record(purpose: str, ttl: Optional[float]) -> Dict[str, Any]:
    record = {"purpose": purpose, "user": _user(), "host": socket.gethostname(), "pid": os.getpid(),
              "machine": _machine(), "start_ticks": _start_ticks(os.getpid()), "acquired": time.time(),
              "token": uuid.uuid4().hex}
    if ttl is not None:
        record["ttl"] = ttl
    return record


def _machine() -> Optional[str]:
    """This boot of this machine, and this pid namespace: where a pid names one process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _start_ticks(pid: int) -> Optional[int]:
    """When process `pid` started, in clock ticks since boot (None if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def holder_is_gone(holder: Dict[str, Any]) -> bool:
    """Whether the lock's holder ran in this boot and pid namespace of this machine and has
    exited: its lock is stale at once, so re-running a merge killed here need not wait for
    the lock to go stale. (A holder elsewhere can only be known gone by its lock's age.)"""
    machine = _machine()
    if machine is None or holder.get("machine") != machine or not isinstance(holder.get("pid"), int):
        return False
    return _start_ticks(holder["pid"]) != holder.get("start_ticks")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return str(os.getuid())


def _parse(data: Optional[bytes]) -> Dict[str, Any]:
    try:
        record = json.loads(data) if data else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class OutputLock(abc.ABC):
    """Held from `acquire` to `release` (or as a context manager)."""

    def __init__(self, destination: Destination, purpose: str = "distmerge merge", ttl: float = DEFAULT_TTL) -> None:
        self.destination = destination
        self.purpose = purpose
        self.ttl = ttl
        self.record: Dict[str, Any] = {}
        self.lost: Optional[str] = None  # why the lock was lost while held (object storage only)

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @abc.abstractmethod
    def acquire(self) -> None:
        """Take the lock, or raise `OutputLocked` naming the holder."""

    @abc.abstractmethod
    def release(self) -> None:
        """Let the lock go (a no-op when not held)."""

    def check_held(self) -> None:
        """Raise if the lock was lost while held (object storage: renewal found another holder)."""


class LocalOutputLock(OutputLock):
    def __init__(self, destination: Destination, purpose: str = "distmerge merge", ttl: float = DEFAULT_TTL) -> None:
        super().__init__(destination, purpose, ttl)
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        if os.path.exists(self.destination.url) and not os.path.isdir(self.destination.url):
            raise OutputError(f"output {self.destination.url} exists and is not a directory")
        os.makedirs(self.destination.url, exist_ok=True)
        path = self.destination.path(LOCK_NAME)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 1 << 16, 0))
                os.close(fd)
                raise OutputLocked(self.destination.url, holder, (
                    f"wait for it to finish, or stop it (pid {holder.get('pid', '?')} on {holder.get('host', '?')}): "
                    "the lock is released when that process exits")) from None
            try:  # a holder that released removed the file: our lock is on an orphan inode
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        self.record = _holder_record(self.purpose, None)
        data = json.dumps(self.record).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.destination.path(LOCK_NAME))  # while still locked: see `acquire`
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


class ObjectOutputLock(OutputLock):
    ATTEMPTS = 5

    def __init__(self, destination: Destination, purpose: str = "distmerge merge", ttl: float = DEFAULT_TTL) -> None:
        super().__init__(destination, purpose, ttl)
        self.etag: Optional[str] = None
        self._stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    def _key(self) -> Dict[str, str]:
        bucket, key, _ = self.destination.fs.split_path(self.destination.path(LOCK_NAME))
        return {"Bucket": bucket, "Key": key}

    def _put(self, record: Dict[str, Any], **condition: str) -> Optional[str]:
        """PUT the lock under `condition`; its new ETag, or None when the condition failed
        (or the object it was to replace is gone)."""
        try:
            answer = self.destination.fs.call_s3("put_object", Body=json.dumps(record).encode(),
                                                 **self._key(), **condition)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            if s3_error_code(err) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            raise
        return answer["ETag"]

    def _read(self) -> Optional[Tuple[Dict[str, Any], str, float]]:
        """(The lock's record, its ETag, its age in seconds by the server's clock) in one
        request, or None when there is no lock. The age is the server's time of the answer
        less the object's last write: no client's clock takes part."""
        fs = self.destination.fs

        async def get() -> tuple:
            answer = await fs._call_s3("get_object", **self._key())
            return await answer["Body"].read(), answer

        try:
            data, answer = sync(fs.loop, get)
        except FileNotFoundError:
            return None
        served = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            age = (email.utils.parsedate_to_datetime(served) - answer["LastModified"]).total_seconds()
        except (TypeError, ValueError, KeyError):
            age = 0.0  # no server time to judge by: never stale by age
        return _parse(data), answer["ETag"], age

    def _ours(self, record: Dict[str, Any]) -> Optional[str]:
        """The ETag of the lock if it holds `record` (a write of ours that answered with an
        error after it took effect, e.g. retried after a dropped answer), else None."""
        found = self._read()
        return found[1] if found is not None and found[0].get("token") == record.get("token") else None

    def acquire(self) -> None:
        for _ in range(self.ATTEMPTS):
            record = _holder_record(self.purpose, self.ttl)
            etag = self._put(record, IfNoneMatch="*")
            if etag is None:
                found = self._read()
                if found is None:
                    continue  # released in between: try again
                holder, held_etag, age = found
                if holder.get("token") == record["token"]:
                    etag = held_etag
                else:
                    ttl = holder.get("ttl")
                    live = isinstance(ttl, (int, float)) and age <= ttl
                    if live and not holder_is_gone(holder):
                        raise OutputLocked(self.destination.url, holder, (
                            f"its lock goes stale {max(0, ttl - age):.0f} s after its last renewal unless renewed "
                            "again; wait for that merge to finish"))
                    etag = self._put(record, IfMatch=held_etag)  # a crashed holder's lock: take it over
                    if etag is None:
                        continue  # someone else took it over (or released it) first
            self.record, self.etag, self.lost = record, etag, None
            self._stop = threading.Event()
            self._renewer = threading.Thread(target=self._renew_until_released, name="distmerge-lock", daemon=True)
            self._renewer.start()
            return
        raise OutputError(f"output {self.destination.url}: could not take its lock ({LOCK_NAME}) in "
                          f"{self.ATTEMPTS} attempts; other merges keep taking it")

    def _renew_until_released(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self.renew():
                    return
                renewed = time.monotonic()
            except Exception as err:  # noqa: BLE001 - a failed renewal is retried at the next tick
                if time.monotonic() - renewed > self.ttl:
                    self.lost = f"renewing it failed for longer than its time to live: {err}"
                    return

    def renew(self) -> bool:
        """Rewrite the lock (its age starts again); False, with the lock marked lost, if
        another merge took it."""
        record = dict(self.record, renewed=time.time())
        etag = self._put(record, IfMatch=self.etag) or self._ours(record)
        if etag is None:
            self.lost = "another merge took it over: it had not been renewed for its time to live"
            return False
        self.record, self.etag = record, etag
        return True

    def check_held(self) -> None:
        if self.lost:
            raise LockLost(f"output {self.destination.url}: this merge lost its lock ({self.lost}); "
                           "its work so far is kept: re-run it to resume")

    def release(self) -> None:
        if self.etag is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if not self.lost:
            try:
                self.destination.fs.call_s3("delete_object", **self._key(), IfMatch=self.etag)
            except (OSError, ValueError) as err:
                if s3_error_code(err) != "PreconditionFailed":  # a server without conditional deletes
                    if self._ours(self.record) is not None:
                        self.destination.fs.call_s3("delete_object", **self._key())
        self.etag = None


def output_lock(destination: Destination, purpose: str = "distmerge merge", ttl: float = DEFAULT_TTL) -> OutputLock:
    """The lock of `destination`: flock locally, conditional writes on S3."""
    if not destination.remote:
        return LocalOutputLock(destination, purpose, ttl)
    if split_url(destination.url)[0] == "s3":
        return ObjectOutputLock(destination, purpose, ttl)
    raise OutputError(f"{destination.url}: no lock for {split_url(destination.url)[0]}:// outputs "
                      "(local paths and s3:// have one)")
