"""The destination (a local directory or an fsspec prefix such as s3://bucket/out): refuse
to clobber a checkpoint, resume an interrupted merge of the same plan, and clean up a
failed one.

A finished checkpoint is recognised by its index, which `commit.py` writes last.
"""

from __future__ import annotations

import bisect
import json
import os
import posixpath
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, List, Optional, Set, Tuple

from distmerge.errors import OutputError
from distmerge.io.layout import INDEX_NAME, PARTIAL_SUFFIX, SHARD_FILE
from distmerge.io.storage import Storage, is_remote, join, split_url
from distmerge.output import resume
from distmerge.planner import MergePlan
from distmerge.sizes import format_bytes

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
COMPANION_FILES = TOKENIZER_FILES + ("generation_config.json", "preprocessor_config.json", "mergekit_config.yml")


COMPANION_ALLOWANCE = 16 * 2**20  # config, tokenizer, card and index, written at commit
SHARD_NAME = re.compile(SHARD_FILE.pattern + "(" + re.escape(PARTIAL_SUFFIX) + ")?")


@dataclass
class ResumePoint:
    """What an interrupted merge left that a new writer can carry on from."""

    finished: Set[int] = field(default_factory=set)  # units whose bytes are durable
    writer_state: Any = None  # the writer's `resume` argument (None: start fresh)


class Destination:
    """File operations on the output location, local or remote."""

    def __init__(self, url: str, storage: Storage) -> None:
        self.url = url.rstrip("/") if is_remote(url) else os.path.abspath(os.path.expanduser(split_url(url)[1]))
        self.remote = is_remote(url)
        self.s3 = self.remote and split_url(self.url)[0] == "s3"
        self.storage = storage
        self.fs = storage.filesystem(self.url) if self.remote else None

    def writer_class(self) -> type:
        """The shard writer for this destination: positional writes locally, multipart uploads on S3."""
        if not self.remote:
            from distmerge.output.local_writer import ShardWriter

            return ShardWriter
        if self.s3:
            from distmerge.output.multipart import MultipartShardWriter

            return MultipartShardWriter
        raise OutputError(f"{self.url}: writing to {split_url(self.url)[0]}:// is not supported "
                          "(local paths and s3:// are)")

    def path(self, name: str) -> str:
        return join(self.url, name)

    def names(self) -> List[str]:
        if not self.remote:
            return sorted(os.listdir(self.url)) if os.path.isdir(self.url) else []
        try:
            return sorted(posixpath.basename(p) for p in self.fs.ls(self.url, detail=False, refresh=True))
        except FileNotFoundError:
            return []

    def existing_checkpoint(self, names: Optional[List[str]] = None) -> List[str]:
        """Names that make the destination look like a checkpoint (index first), among
        `names` (default: listed now)."""
        names = self.names() if names is None else names
        return ([INDEX_NAME] if INDEX_NAME in names else []) + [n for n in names if n.endswith(".safetensors")]

    def remove(self, name: str) -> None:
        try:
            if self.remote:
                self.fs.rm_file(self.path(name))
            else:
                os.remove(self.path(name))
        except FileNotFoundError:
            pass

    def read(self, name: str) -> Optional[bytes]:
        try:
            if self.remote:
                return self.fs.cat_file(self.path(name))
            with open(self.path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        if self.remote:
            self.fs.pipe_file(self.path(name), data)
            return
        from distmerge.output.local_writer import space_errors

        tmp = self.path(name + ".tmp")
        with space_errors(self.url):
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                self.remove(name + ".tmp")
                raise
        os.replace(tmp, self.path(name))

    def holds_merge_of(self, plan: MergePlan) -> bool:
        """Whether a finished checkpoint is here that a merge of `plan`'s config and inputs
        (as they are now) committed: its index records their fingerprints."""
        data = self.read(INDEX_NAME)
        try:
            metadata = json.loads(data).get("metadata", {}) if data is not None else {}
        except ValueError:
            return False
        recorded = metadata.get(resume.INDEX_FINGERPRINTS) if isinstance(metadata, dict) else None
        if not isinstance(recorded, dict):
            return False
        return recorded == resume.request_fingerprints(plan)

    def recorded_options(self) -> dict:
        """The options of an interrupted merge here (empty if none), so a resume plans alike."""
        return resume.recorded_options(self) if INDEX_NAME not in self.names() else {}

    def check(self, overwrite: bool, plan: MergePlan, restart: bool = False, part_size: int = 0) -> bool:
        """Raise the refusals `prepare` would, changing nothing; return whether an
        interrupted merge is here (a manifest or partial shards, no index)."""
        if not self.remote and os.path.exists(self.url) and not os.path.isdir(self.url):
            raise OutputError(f"output {self.url} exists and is not a directory")
        if self.s3:
            from distmerge.output.multipart import check_part_size

            check_part_size(plan.layout, part_size)
        names = self.names()
        ours = [n for n in names if SHARD_NAME.fullmatch(n)]
        # Locally a manifest with no shard files next to it (killed while starting) leaves
        # nothing to resume: start afresh. On S3 the uploads are not in the listing.
        interrupted = INDEX_NAME not in names and (
            any(n.endswith(PARTIAL_SUFFIX) for n in ours)
            or (resume.MANIFEST in names and (self.remote or bool(ours))))
        if interrupted and not restart:
            changes = resume.changed_since(self, plan, part_size)
            if changes:
                raise self._not_resumable("; ".join(changes))
            if not self.remote and not self._shards_fit(plan, ours):
                raise self._not_resumable("its partial shards do not match the plan")
        existing = self.existing_checkpoint(names)
        if not interrupted and existing and not overwrite:
            raise OutputError(f"output {self.url} already holds a checkpoint ({existing[0]}); "
                              "pass --overwrite (overwrite=True) to replace it")
        if not self.remote:
            self._check_free_space(plan, names)
        return interrupted

    def _check_free_space(self, plan: MergePlan, names: List[str]) -> None:
        """Refuse a local output whose filesystem cannot take the checkpoint. Shards already
        here (to resume, or replaced by this merge) count as space it has."""
        held = 0
        for name in names:
            if SHARD_NAME.fullmatch(name) or name.endswith(".safetensors"):
                try:
                    held += os.stat(self.path(name)).st_blocks * 512
                except FileNotFoundError:
                    pass
        needed = sum(shard.size for shard in plan.layout.shards) + COMPANION_ALLOWANCE - held
        probe = self.url
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        free = shutil.disk_usage(probe).free
        if needed > free:
            raise OutputError(f"output {self.url}: the checkpoint needs {format_bytes(needed)} more on its "
                              f"filesystem, which has {format_bytes(free)} free; free space or choose another output")

    def _shards_fit(self, plan: MergePlan, ours: List[str]) -> bool:
        """Every shard of the plan is here once, partial or already renamed, at its size."""
        for shard in plan.layout.shards:
            here = [n for n in (shard.file_name, shard.file_name + PARTIAL_SUFFIX) if n in ours]
            if len(here) != 1 or os.path.getsize(self.path(here[0])) != shard.size:
                return False
        return len(ours) == len(plan.layout.shards)

    def _not_resumable(self, reason: str) -> OutputError:
        return OutputError(f"output {self.url} holds an interrupted merge that cannot be resumed: {reason}. "
                           "Pass --restart (restart=True) to discard it and start over")

    def prepare(self, overwrite: bool, plan: MergePlan, restart: bool = False, part_size: int = 0) -> ResumePoint:
        """Make the destination ready; return what an interrupted run of this plan left.

        A finished checkpoint (one with an index) is refused unless `overwrite`. An
        interrupted merge (a manifest or partial shards, no index) of the same plan is
        resumed; one of a different plan is refused, saying what changed, unless
        `restart` discards it.
        """
        interrupted = self.check(overwrite, plan, restart, part_size)
        if interrupted and not restart:
            point = self.resume_point(plan, part_size)
            if point is None:
                raise self._not_resumable("its partial shards do not match the plan")
            return point
        if interrupted:
            self.discard()  # the interrupted merge's shards (any shard count), not others' files
        else:
            existing = self.existing_checkpoint()
            # The index goes first, so a half-removed checkpoint never looks finished; then
            # the old checkpoint's companion files, which could belong to another base model.
            for name in existing + [n for n in (*COMPANION_FILES, "config.json", "README.md") if existing]:
                self.remove(name)
            self._drop_resume_state()
        if not self.remote:
            os.makedirs(self.url, exist_ok=True)
        resume.write_manifest(self, plan, part_size)
        return ResumePoint()

    def resume_point(self, plan: MergePlan, part_size: int = 0) -> Optional[ResumePoint]:
        """What is durable here of `plan`'s output; None if it does not fit the plan.

        Also how a dead writer's replacement learns where to carry on. No writer may be
        running: local shards that an interrupted commit already renamed go back to their
        partial names.
        """
        if self.s3:
            from distmerge.output.multipart import done_ranges, recover_uploads

            states = recover_uploads(self.fs, self.url, plan.layout, part_size)
            return ResumePoint(units_within(plan, done_ranges(states, plan.layout, part_size)), states)
        if self.remote:
            return None
        if not self._shards_fit(plan, [n for n in self.names() if SHARD_NAME.fullmatch(n)]):
            return None
        for shard in plan.layout.shards:
            if os.path.exists(self.path(shard.file_name)):
                os.replace(self.path(shard.file_name), self.path(shard.file_name + PARTIAL_SUFFIX))
        finished = resume.finished_units(self.url, len(plan.units))
        written = [0] * len(plan.layout.shards)
        for unit in plan.units:
            if unit.index in finished:
                for piece in unit.pieces:
                    written[piece.shard] += piece.out_nbytes
        return ResumePoint(finished, written)

    def _drop_resume_state(self) -> None:
        if self.s3:
            from distmerge.output.multipart import abort_shard_uploads, remove_resume_state

            abort_shard_uploads(self.fs, self.url)
            remove_resume_state(self.fs, self.url)
        elif not self.remote:
            resume.remove_local(self.url)

    def discard(self) -> None:
        """Delete what a failed merge left, its shards and the resume state, so the next run
        starts over. The writer must be stopped; a finished checkpoint is never touched."""
        names = self.names()
        if INDEX_NAME in names:
            return
        for name in names:
            if SHARD_NAME.fullmatch(name):
                self.remove(name)
        self._drop_resume_state()

    def finish(self) -> None:
        """Drop the resume state once the checkpoint is committed (and any stray upload of
        one of its shards, such as a duplicate from a retried create request)."""
        self._drop_resume_state()


def units_within(plan: MergePlan, ranges: List[List[Tuple[int, int]]]) -> Set[int]:
    """Units whose every output byte lies in the given (sorted) byte ranges of their shards."""
    merged: List[List[Tuple[int, int]]] = []
    for shard_ranges in ranges:
        spans: List[Tuple[int, int]] = []
        for start, end in shard_ranges:
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            else:
                spans.append((start, end))
        merged.append(spans)
    starts = [[a for a, _ in spans] for spans in merged]

    def covered(shard: int, start: int, end: int) -> bool:
        i = bisect.bisect_right(starts[shard], start) - 1
        return i >= 0 and merged[shard][i][1] >= end

    return {u.index for u in plan.units
            if all(covered(p.shard, p.out_offset, p.out_offset + p.out_nbytes) for p in u.pieces)}


def existing_checkpoint(out: str, storage: Storage) -> List[str]:
    return Destination(out, storage).existing_checkpoint()


