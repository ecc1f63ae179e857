"""`distmerge batch`: merge every request under a prefix, each at most once.

A request is a mergekit config (YAML, `*.yml`/`*.yaml`) with one more top-level key,
`output: URL`. Requests are taken in name order; each ends as one of:

- skipped: its output is a finished checkpoint of this request (the index records the
  fingerprints of the config and of the inputs' versions, and they match);
- resumed: an interrupted merge of it was there and has been finished;
- merged: merged from scratch;
- failed: a bad request, a missing input, a refused destination or a failed merge
  (the error is reported; the other requests go on);
- locked: another merge (another batch, a cron tick that overlaps) holds its output.

Nothing heavy happens for a request that is skipped: the batch reads the request, the
inputs' headers and the output's index, and starts Ray only if something is to merge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import posixpath
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import yaml

from distmerge import __version__
from distmerge.config import MergeConfig, load_config
from distmerge.engine.session import ray_session
from distmerge.errors import ConfigError, DistmergeError
from distmerge.io.storage import Storage, is_remote, join, split_url
from distmerge.job import MergeJob, MergeOptions, object_store_size
from distmerge.output.lock import OutputLocked

STATUSES = ("skipped", "resumed", "merged", "failed", "locked")
REQUEST_SUFFIXES = (".yml", ".yaml")
PURPOSE = "distmerge batch"


@dataclass
class RequestResult:
    request: str
    output: Optional[str] = None
    status: str = "failed"
    error: Optional[str] = None
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0


@dataclass
class BatchReport:
    source: str
    started: str
    finished: str = ""
    requests: List[RequestResult] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(r.status == "failed" for r in self.requests)

    def counts(self) -> Dict[str, int]:
        return {status: sum(r.status == status for r in self.requests) for status in STATUSES}

    def to_json(self) -> dict:
        return {"distmerge_version": __version__, "source": self.source, "started": self.started,
                "finished": self.finished, "counts": self.counts(),
                "requests": [dataclasses.asdict(r) for r in self.requests]}

    def format(self) -> str:
        counts = ", ".join(f"{n} {status}" for status, n in self.counts().items() if n)
        return f"batch {self.source}: {len(self.requests)} request(s): {counts or 'none'}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def list_requests(source: str, storage: Storage) -> List[str]:
    """The request files directly under `source` (a directory or prefix), in name order."""
    remote = is_remote(source)
    root = source.rstrip("/") if remote else os.path.abspath(source)
    if not remote and not os.path.isdir(root):
        raise ConfigError(f"{source}: no such directory of merge requests")
    try:
        entries = storage.filesystem(source).ls(root, detail=True, refresh=True)
    except FileNotFoundError:  # an S3 prefix with nothing under it yet
        entries = []
    names = sorted(posixpath.basename(e["name"]) for e in entries if e.get("type") == "file")
    return [join(root, n) for n in names if n.endswith(REQUEST_SUFFIXES)]


def load_request(url: str, text: str) -> Tuple[MergeConfig, str]:
    """(The config, the output) of a request file; errors name the request file."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{url}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{url}: a merge request is a mergekit config (a mapping) with an 'output' key")
    output = raw.pop("output", None)
    if not isinstance(output, str) or not output.strip():
        raise ConfigError(f"{url}: key 'output': is required: where this request's checkpoint goes "
                          "(a local directory or an s3:// prefix)")
    base_dir = os.path.dirname(url) if not is_remote(url) else None
    if not is_remote(output):
        output = os.path.expanduser(split_url(output)[1])
        if not os.path.isabs(output):
            output = os.path.join(base_dir or os.getcwd(), output)
    config = load_config(yaml.safe_dump(raw, sort_keys=False), is_text=True, source=url, base_dir=base_dir)
    return config, output


class Batch:
    """One pass over a request prefix. `run` returns the report (and writes it, if asked)."""

    def __init__(self, source: str, options: MergeOptions = MergeOptions(), parallel: int = 1,
                 report_url: Optional[str] = None, on_result: Callable[[RequestResult], None] = lambda r: None) -> None:
        self.source = source
        self.options = dataclasses.replace(options, progress=False)
        self.parallel = max(1, parallel)
        self.report_url = report_url
        self.storage = Storage(dict(options.storage_options or {}))
        self.on_result = on_result
        self._lock = threading.Lock()

    def run(self) -> BatchReport:
        report = BatchReport(self.source, _now())
        try:
            to_merge = self._plan_all(report)
            if to_merge:
                self._merge_all(to_merge)
        finally:
            report.finished = _now()
            if self.report_url:
                self._write_report(report)
        return report

    def _plan_all(self, report: BatchReport) -> List[Tuple[RequestResult, MergeJob]]:
        """Read and plan every request (headers only); the ones left to merge, with their jobs."""
        prepared = []
        for url in list_requests(self.source, self.storage):
            result, job = self._prepare(url)
            report.requests.append(result)
            prepared.append((result, job))
        by_output: Dict[str, List[RequestResult]] = {}
        for result, job in prepared:
            if job is not None:
                by_output.setdefault(job.destination.url, []).append(result)
        to_merge = []
        for result, job in prepared:
            sharing = by_output.get(job.destination.url, []) if job is not None else []
            if len(sharing) > 1:
                others = ", ".join(r.request for r in sharing if r is not result)
                result.status, result.error, job = "failed", (
                    f"{result.request}: output {result.output} is also the output of {others}; "
                    "give each request its own output"), None
            if job is None:
                self.on_result(result)
            else:
                result.error = "not run: the batch ended before this request's turn"
                to_merge.append((result, job))
        return to_merge

    def _merge_all(self, to_merge: List[Tuple[RequestResult, MergeJob]]) -> None:
        """Merge in one Ray session: in this thread, or `parallel` at a time in threads (an
        interruption then interrupts every running merge, which keeps its work for a resume)."""
        store = object_store_size(sum(sorted((j.object_store_bytes() for _, j in to_merge),
                                             reverse=True)[:self.parallel]))
        with contextlib.ExitStack() as session:
            try:
                session.enter_context(ray_session(self.options.address, to_merge[0][1].workers, store))
            except Exception as err:  # noqa: BLE001 - reported per request; the report is still written
                for result, _ in to_merge:
                    result.status, result.error = "failed", f"Ray could not be started or joined: {_message(err)}"
                    self.on_result(result)
                return
            if self.parallel == 1:
                for item in to_merge:
                    self._merge(*item)
                return
            with ThreadPoolExecutor(self.parallel, thread_name_prefix="distmerge-batch") as pool:
                futures = [pool.submit(self._merge, *item) for item in to_merge]
                try:
                    wait(futures)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    for _, job in to_merge:
                        job.cancel.set()
                    wait(futures)
                    raise

    def _prepare(self, url: str):
        """Read and plan a request (headers only): (its result so far, the job, or None when
        nothing is left to do: skipped, or failed already)."""
        started = time.perf_counter()
        result = RequestResult(request=url)
        try:
            text = self.storage.filesystem(url).cat_file(url).decode("utf-8")
            config, result.output = load_request(url, text)
            job = MergeJob(config, result.output, self.options, purpose=PURPOSE)
            job.make_plan()
            if job.is_done():
                result.status = "skipped"
                job = None
        except Exception as err:  # noqa: BLE001 - one request's failure must not stop the others
            result.status, result.error, job = "failed", _message(err), None
        result.seconds = time.perf_counter() - started
        return result, job

    def _merge(self, result: RequestResult, job: MergeJob) -> None:
        """Run one request's merge, recording how it ended (one request's failure does not
        stop the others; an interruption is recorded, then goes on up)."""
        started = time.perf_counter() - result.seconds
        try:
            self._run_request(result, job)
        except Exception as err:  # noqa: BLE001 - see the docstring
            result.status, result.error = "failed", _message(err)
        except BaseException as err:
            result.status, result.error = "failed", f"interrupted ({_message(err)}); re-run the batch to resume it"
            raise
        finally:
            result.seconds = time.perf_counter() - started
            with self._lock:
                self.on_result(result)

    @staticmethod
    def _run_request(result: RequestResult, job: MergeJob) -> None:
        result.error = None
        try:
            job.acquire_lock()
        except OutputLocked as err:
            result.status, result.error = "locked", str(err)
            return
        try:
            job.make_plan()  # again, under the lock: what is there now is what counts
            if job.is_done():  # finished by another merge between the first plan and the lock
                result.status = "skipped"
                return
            summary = job.execute()
            result.status = "resumed" if job.resumed else "merged"
            result.bytes_read, result.bytes_written = summary.read_bytes, summary.written_bytes
        finally:
            job.close()

    def _write_report(self, report: BatchReport) -> None:
        data = (json.dumps(report.to_json(), indent=2) + "\n").encode()
        if is_remote(self.report_url):
            self.storage.filesystem(self.report_url).pipe_file(self.report_url, data)
            return
        directory = os.path.dirname(os.path.abspath(self.report_url))
        os.makedirs(directory, exist_ok=True)
        tmp = self.report_url + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.report_url)


def _message(err: BaseException) -> str:
    if isinstance(err, DistmergeError):
        return str(err)
    return f"{type(err).__name__}: {err}"


def run_batch(source: str, options: MergeOptions = MergeOptions(), parallel: int = 1,
              report_url: Optional[str] = None, on_result: Callable[[RequestResult], None] = lambda r: None
              ) -> BatchReport:
    """Merge every request under `source` that is not merged yet; see the module docstring."""
    return Batch(source, options, parallel, report_url, on_result).run()

