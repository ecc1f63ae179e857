"""Resumable local merges: a manifest that pins the plan, and a log of finished units.

`.distmerge-manifest.json` records fingerprints of what shapes the output bytes (the
config, the inputs' versions, the plan: layout, units and their offsets). The writer
appends the index of each unit to `.distmerge-progress` only after that unit's bytes
are synced to the shard files, so after a crash every logged unit is on disk. A re-run
of the same merge reuses them; a re-run of a different one is refused (with what
changed) unless told to restart.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Dict, Set

if TYPE_CHECKING:  # the writer actor imports this module and must not pay for torch
    from distmerge.planner import MergePlan

MANIFEST = ".distmerge-manifest.json"
PROGRESS = ".distmerge-progress"
WHAT = {
    "config": "the merge config changed",
    "inputs": "an input model changed (a file's size, ETag or modification time)",
    "plan": "the options that shape the output changed (shard size, memory per worker, dtypes, ...)",
}


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprints(plan: MergePlan) -> Dict[str, str]:
    units = [[(p.meta.tensor, p.meta.row_start, p.meta.row_end, p.shard, p.out_offset, p.out_nbytes)
              for p in u.pieces] for u in plan.units]
    return {
        "config": _digest(plan.config.text),
        "inputs": _digest([sorted(c.versions.items()) for c in plan.checkpoints]),
        "plan": _digest([plan.layout.index_json(), [s.header.hex() for s in plan.layout.shards], units]),
    }


def write_manifest(out_dir: str, plan: MergePlan) -> None:
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"version": 1, "units": len(plan.units), "fingerprints": fingerprints(plan)}, f)
        f.flush()
        os.fsync(f.fileno())
    open(os.path.join(out_dir, PROGRESS), "w").close()


def changed_since(out_dir: str, plan: MergePlan) -> list:
    """What differs between the interrupted merge in `out_dir` and `plan` (empty: same merge)."""
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
            recorded = json.load(f).get("fingerprints", {})
    except (OSError, ValueError):
        return ["its manifest is missing or unreadable"]
    now = fingerprints(plan)
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
    with open(path, "w", encoding="ascii") as f:
        f.write("".join(f"{u}\n" for u in sorted(done)))
        f.flush()
        os.fsync(f.fileno())
    return done


def remove(out_dir: str) -> None:
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
