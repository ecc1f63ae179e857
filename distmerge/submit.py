"""`distmerge submit`: run a merge (or a batch) on a Ray cluster through its Jobs API.

The job runs `distmerge merge CONFIG OUT --address auto ...` on the cluster; the config
travels with the job (as its working directory), so no shared filesystem is needed for
it. A merge's submission id is derived from the config, OUT and the options that shape
the merge: submitting the same merge again attaches to the job already running (or
finished) instead of starting a second one. The command follows the job's logs and
exits with its status.

Clusters started with token authentication (current Ray's default) are reached the way
Ray's own clients reach them: the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, TextIO

from distmerge.config import load_config
from distmerge.errors import ConfigError, DistmergeError
from distmerge.io.storage import Storage, is_remote, split_url
from distmerge.output.resume import merge_settings
from distmerge.planner import DEFAULT_SHARD_SIZE
from distmerge.sizes import parse_size

CONFIG_NAME = "merge.yml"
FINISHED = {"SUCCEEDED", "FAILED", "STOPPED"}
SUBMIT_ATTEMPTS = 5


class SubmitError(DistmergeError):
    """The job could not be submitted, or the cluster could not be reached."""


@dataclass(frozen=True)
class JobRequest:
    """What to run on the cluster: the entrypoint's arguments after `distmerge`, the files
    that travel with it (name -> text), and the submission id."""

    arguments: List[str]
    files: dict
    submission_id: str

    @property
    def entrypoint(self) -> str:
        return "distmerge " + " ".join(shlex.quote(a) for a in self.arguments)


def merge_request(config_path: str, out: str, merge_arguments: Sequence[str]) -> JobRequest:
    """The job for one merge. The config is checked here (keys, method, parameters) so that
    a bad one is refused before anything is submitted; the inputs are the cluster's to read."""
    try:
        with open(config_path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ConfigError(f"{config_path}: cannot read config ({err.strerror})") from err
    config = load_config(text, is_text=True, source=config_path, base_dir=os.path.dirname(os.path.abspath(config_path)))
    for model in config.inputs:
        if not is_remote(model.ref) and not os.path.isabs(os.path.expanduser(model.ref)):
            raise ConfigError(f"{config_path}: model {model.ref!r} is a relative path; the merge runs on the cluster, "
                              "so give each model as an absolute path there or as a URL (s3://...)")
    out = _cluster_location(out, "OUT")
    arguments = ["merge", CONFIG_NAME, out, "--address", "auto", "--no-progress", *merge_arguments]
    identity = [merge_settings(text), out.rstrip("/"), canonical_options(merge_arguments)]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return JobRequest(arguments, {CONFIG_NAME: text}, f"distmerge-merge-{digest}")


def _cluster_location(where: str, name: str) -> str:
    """A path or URL as the cluster sees it: a URL, or an absolute path (on the cluster's head)."""
    if is_remote(where):
        return where
    path = split_url(where)[1]
    if not os.path.isabs(path):
        raise ConfigError(f"{name} {where!r} is a relative path; the job runs on the cluster, so give an "
                          "s3:// URL or an absolute path as the cluster's head sees it")
    return path


SIZE_OPTIONS = {"--shard-size", "--memory-per-worker", "--part-size"}
SECRET_OPTIONS = {"--storage-options"}


def canonical_options(arguments: Sequence[str]) -> Dict[str, object]:
    """`--flag value` arguments as one value per flag, sizes in bytes and JSON parsed, so that
    the same options written differently give the same submission id."""
    options: Dict[str, object] = {}
    items = list(arguments)
    while items:
        flag = items.pop(0)
        value: object = True
        if items and not items[0].startswith("--"):
            value = items.pop(0)
            if flag in SIZE_OPTIONS:
                value = parse_size(value)
            elif flag in SECRET_OPTIONS:
                value = json.loads(value)
        options[flag] = value
    if options.get("--shard-size") == DEFAULT_SHARD_SIZE:
        del options["--shard-size"]
    return options


def redacted_command(request: JobRequest) -> str:
    """The entrypoint as it may be printed: storage options with their secrets masked."""
    shown, items = [], list(request.arguments)
    while items:
        item = items.pop(0)
        shown.append(item)
        if item in SECRET_OPTIONS and items:
            shown.append(json.dumps(Storage(json.loads(items.pop(0))).redacted()))
    return "distmerge " + " ".join(shlex.quote(a) for a in shown)


def batch_request(source: str, batch_arguments: Sequence[str], submission_id: Optional[str] = None) -> JobRequest:
    """The job for a batch. Each batch run is a new job (the batch itself skips what is
    merged already), unless a submission id is given."""
    source = _cluster_location(source, "SOURCE")
    arguments = ["batch", source, "--address", "auto", *batch_arguments]
    if "--report" in arguments:
        at = arguments.index("--report") + 1
        arguments[at] = _cluster_location(arguments[at], "--report")
    return JobRequest(arguments, {}, submission_id or f"distmerge-batch-{time.strftime('%Y%m%dT%H%M%S')}-"
                                                      f"{uuid.uuid4().hex[:8]}")


def _enable_token_auth() -> None:
    """Send the cluster token when one is found, as `ray job submit` does with RAY_AUTH_MODE=token
    (a head without authentication ignores it)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def _client(address: str):
    _enable_token_auth()
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as err:
        raise SubmitError(f"distmerge submit needs Ray's job client: pip install 'ray[default]' ({err})") from err
    try:
        return JobSubmissionClient(address)
    except (RuntimeError, ConnectionError, OSError) as err:
        raise SubmitError(f"cannot reach the Ray job server at {address}: {err}") from err


def _existing(client, submission_id: str):
    return next((job for job in client.list_jobs() if job.submission_id == submission_id), None)


def submit(request: JobRequest, address: str, *, wait: bool = True, retry: bool = False,
           out: TextIO = sys.stdout) -> int:
    """Submit `request` (or attach to its job), follow its logs when `wait`; the exit status:
    0 when the job succeeded (or, without `wait`, was submitted), 1 otherwise."""
    client = _client(address)
    job = _existing(client, request.submission_id)
    if job is not None and retry and _status_name(job.status) in ("FAILED", "STOPPED"):
        print(f"job {request.submission_id} ended {_status_name(job.status)}; deleting it to submit again", file=out)
        client.delete_job(request.submission_id)
        job = None
    if job is None:
        _submit_new(client, request, address, out)
    else:
        status = _status_name(job.status)
        print(f"job {request.submission_id} already exists ({status}); attaching instead of submitting again"
              + (" (pass --retry to submit it again)" if status in ("FAILED", "STOPPED") else ""), file=out)
        if not wait:
            return 1 if status in ("FAILED", "STOPPED") else 0
    if not wait:
        return 0
    status = asyncio.run(_follow(client, request.submission_id, out))
    print(f"job {request.submission_id} {status}", file=out)
    return 0 if status == "SUCCEEDED" else 1


def _submit_new(client, request: JobRequest, address: str, out: TextIO) -> None:
    """Submit the job; a job server that is still starting (no job agent yet) is given a
    few tries. An identical submission that won the race is attached to instead."""
    with tempfile.TemporaryDirectory(prefix="distmerge-submit-") as work:
        for name, text in request.files.items():
            with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                f.write(text)
        runtime_env = {"working_dir": work} if request.files else None
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                client.submit_job(entrypoint=request.entrypoint, submission_id=request.submission_id,
                                  runtime_env=runtime_env)
                print(f"submitted job {request.submission_id}: {redacted_command(request)}", file=out)
                return
            except RuntimeError as err:
                if _existing(client, request.submission_id) is not None:
                    print(f"job {request.submission_id} was just submitted by someone else; attaching", file=out)
                    return
                if attempt + 1 == SUBMIT_ATTEMPTS:
                    raise SubmitError(f"submitting to {address} failed {SUBMIT_ATTEMPTS} times, last: {err}") from err
                time.sleep(2 * (attempt + 1))


async def _follow(client, submission_id: str, out: TextIO) -> str:
    async for lines in client.tail_job_logs(submission_id):
        out.write(lines)
        out.flush()
    while True:  # the log stream ends as the job does; its status may lag a moment
        status = _status_name(client.get_job_status(submission_id))
        if status in FINISHED:
            return status
        await asyncio.sleep(0.5)


def _status_name(status: object) -> str:
    """'SUCCEEDED' for JobStatus.SUCCEEDED (an enum whose str() differs across Ray versions)."""
    return str(getattr(status, "value", status)).split(".")[-1]
