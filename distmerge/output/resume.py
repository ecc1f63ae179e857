"""Resumable merges: a manifest that pins the plan, and a record of what is durable.

`.distmerge-manifest.json`, next to the output (a local directory or an S3 prefix),
records fingerprints of what shapes the output bytes (the config, the inputs'
versions, the plan: layout, units and their offsets; the multipart part size on S3)
and the options the plan was made with. What is durable is recorded by the writer:
locally, `.distmerge-progress` lists each unit only after its bytes are synced to the
shard files; on S3, the in-progress multipart uploads and their parts are the record
(see `multipart.py`). A re-run of the same merge reuses that work; a re-run of a
different one is refused (saying what changed) unless told to restart.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Dict, List, Optional, Protocol, Set

import yaml

if TYPE_CHECKING:  # the writer actor imports this module and must not pay for torch
    from distmerge.planner import MergePlan

MANIFEST = ".distmerge-manifest.json"
PROGRESS = ".distmerge-progress"
MANIFEST_VERSION = 4
WHAT = {
    "config": "the merge config changed",
    "inputs": "an input model changed (a file's size, ETag or modification time)",
    "plan": "the options that shape the output changed (shard size, memory per worker, dtypes, ...)",
    "parts": "the multipart part size (--part-size) changed",
    "seed": "the random seed (--random-seed or random_seed) changed",
}

# What a finished checkpoint's index records (under this metadata key) of the merge that
# made it, so that a batch can tell a request it already merged: the config and inputs.
INDEX_FINGERPRINTS = "distmerge_fingerprints"
REQUEST_FINGERPRINTS = ("config", "inputs")


class StateFiles(Protocol):
    """Small files next to the output (a `Destination`)."""

    def read(self, name: str) -> Optional[bytes]: ...

    def write(self, name: str, data: bytes) -> None: ...


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def merge_settings(config_text: str) -> object:
    """What of a config shapes the merge: the parsed YAML (so layout, comments and key order do
    not count) without its `storage:` section (credentials and endpoints may change)."""
    raw = yaml.safe_load(config_text)
    if isinstance(raw, dict):
        raw = {key: value for key, value in raw.items() if key != "storage"}
    return raw


def request_fingerprints(plan: MergePlan) -> Dict[str, str]:
    """The fingerprints (REQUEST_FINGERPRINTS) of what was asked for: the config and the inputs' versions."""
    return {
        "config": _digest(merge_settings(plan.config.text)),
        "inputs": _digest([sorted(c.versions.items()) for c in plan.checkpoints]),
    }


def fingerprints(plan: MergePlan, part_size: int = 0) -> Dict[str, str]:
    units = [[(p.meta.tensor, p.meta.row_start, p.meta.row_end, p.shard, p.out_offset, p.out_nbytes)
              for p in u.pieces] for u in plan.units]
    return {
        **request_fingerprints(plan),
        "plan": _digest([plan.layout.index_json(), [s.header.hex() for s in plan.layout.shards], units]),
        "parts": _digest(part_size),
        "seed": _digest(plan.seed),
    }


def write_manifest(files: StateFiles, plan: MergePlan, part_size: int = 0) -> None:
    manifest = {"version": MANIFEST_VERSION, "units": len(plan.units),
                "fingerprints": fingerprints(plan, part_size),
                "options": {"memory_per_worker": plan.memory_per_worker, "part_size": part_size,
                            "random_seed": plan.seed}}
    files.write(MANIFEST, json.dumps(manifest).encode())


def read_manifest(files: StateFiles) -> Optional[dict]:
    """The interrupted merge's manifest, or None when absent or unreadable."""
    try:
        data = files.read(MANIFEST)
        manifest = json.loads(data) if data is not None else None
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def recorded_options(files: StateFiles) -> Dict[str, int]:
    """The options an interrupted merge was planned with (so a resume can plan the same)."""
    manifest = read_manifest(files) or {}
    options = manifest.get("options")
    return {k: v for k, v in options.items() if isinstance(v, int)} if isinstance(options, dict) else {}


def changed_since(files: StateFiles, plan: MergePlan, part_size: int = 0) -> List[str]:
    """What differs between the interrupted merge recorded in `files` and `plan` (empty: same)."""
    manifest = read_manifest(files)
    if manifest is None or manifest.get("version") != MANIFEST_VERSION:
        return ["its manifest is missing, unreadable or from another version"]
    recorded = manifest.get("fingerprints", {})
    now = fingerprints(plan, part_size)
    return [WHAT[k] for k in WHAT if recorded.get(k) != now[k]]


def finished_units(out_dir: str, unit_count: int) -> Set[int]:
    """Units logged as synced to disk; the log is rewritten clean (a torn last line, from a
    crash mid-append, is dropped, so later appends cannot merge with it)."""
    path = os.path.join(out_dir, PROGRESS)
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            lines = f.read().split("\n")
    except OSError:
        lines = [""]
    done = {int(line) for line in lines[:-1] if line.strip().isdigit() and int(line) < unit_count}
    with open(path + ".tmp", "w", encoding="ascii") as f:
        f.write("".join(f"{u}\n" for u in sorted(done)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)  # a crash here keeps the old log or the new one, never neither
    return done


def remove_local(out_dir: str) -> None:
    for name in (PROGRESS, MANIFEST):
        try:
            os.remove(os.path.join(out_dir, name))
        except FileNotFoundError:
            pass


class ProgressLog:
    """Appends finished units, each only after the shard data is synced (in small batches)."""

    BATCH = 8

    def __init__(self, out_dir: str) -> None:
        self.path = os.path.join(out_dir, PROGRESS)
        self.pending: list = []

    def add(self, unit: int, shard_fds) -> None:
        self.pending.append(unit)
        if len(self.pending) >= self.BATCH:
            self.flush(shard_fds)

    def flush(self, shard_fds) -> None:
        if not self.pending:
            return
        for fd in shard_fds:
            os.fdatasync(fd)
        with open(self.path, "a", encoding="ascii") as f:
            f.write("".join(f"{u}\n" for u in self.pending))
            f.flush()
            os.fsync(f.fileno())
        self.pending = []
