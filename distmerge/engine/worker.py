"""What a worker does with one work unit. Stateless and Ray-free: the driver wraps it.

For each piece: map its input rows, cast them to the compute dtype, and run the
method's protocol step (a statistics pass, or apply). Pieces of single-piece reduction
groups run the whole protocol here, so the common case reads its inputs once.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from distmerge.errors import InputError
from distmerge.io.dtypes import SAFETENSORS_TO_TORCH
from distmerge.io.reader import local_version, map_range
from distmerge.io.remote import changed_error, read_remote_many
from distmerge.io.storage import Storage, is_remote, split_url
from distmerge.memory import peak_rss
from distmerge.methods import fused, get_method
from distmerge.methods.base import MergeMethod, Phase, PieceInputs, reduce_statistics, run_in_memory
from distmerge.planner import FETCH_BATCH_BYTES, SPLIT_ALIGN_ELEMENTS, Piece, WorkUnit

WHOLE_GROUP = "whole group"  # carry marker: this piece is its whole reduction group: run every phase here
# Row ranges of about this many elements keep a method's temporaries in the CPU caches.
SUB_PIECE_ELEMENTS = 768 * 1024


@dataclass(frozen=True)
class WorkerStats:
    pid: int
    read_bytes: int
    peak_rss: int
    started: float = 0.0  # wall clock (time.time()) when the task began
    cpu_seconds: float = 0.0  # the task's CPU time (all its threads)


def _has_nonfinite(tensor: torch.Tensor) -> bool:
    if fused.scans_finite(tensor):
        return fused.first_nonfinite(tensor) is not None
    # A sum is ~20x cheaper than isfinite() and is non-finite whenever a NaN/Inf is present.
    return bool(tensor.numel()) and not torch.isfinite(tensor.sum()) and not bool(torch.isfinite(tensor).all())


def _check_finite(tensor: torch.Tensor, piece: Piece, path: str) -> None:
    if _has_nonfinite(tensor):
        meta = piece.meta
        raise InputError(f"{path}: tensor {meta.tensor!r} holds NaN or Inf values (rows {meta.row_start}.."
                         f"{meta.row_end}); fix the input, or pass --allow-nonfinite to merge anyway")


SCRATCH_PREFIX = "distmerge-scratch-"
ORPHAN_AGE = 3600.0  # seconds: a scratch directory untouched this long, of a process gone, is an orphan


def _remove_orphaned_scratch() -> None:
    """Remove the scratch directories of tasks killed before they could clean up: each is
    named after its process id; one whose process is gone and that was last changed over
    ORPHAN_AGE ago (a TMPDIR shared with another pid namespace stays safe) is removed."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        if not name.startswith(SCRATCH_PREFIX):
            continue
        pid = name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
            continue
        path = os.path.join(root, name)
        try:
            if time.time() - os.stat(path).st_mtime > ORPHAN_AGE:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def _key(piece: Piece) -> Tuple[str, int]:
    """A piece's identity within a unit: its tensor and first row."""
    return piece.meta.tensor, piece.meta.row_start


class InputReader:
    """Loads pieces' input rows and counts the bytes read from the inputs' storage.

    With `keep`, a piece may be loaded again (a streamed unit loads each piece once per
    statistics phase and once to apply): remote bytes are fetched once and kept in a
    local scratch file (under TMPDIR), and NaN/Inf are checked on the first load only;
    local inputs are mapped again, from the page cache.

    `order` is the sequence in which pieces will be loaded (a unit's pieces): a fetch
    then takes the pieces after the one asked for too, up to FETCH_BATCH_BYTES.
    """

    def __init__(self, storage: Storage, allow_nonfinite: bool = False, keep: bool = False,
                 order: Sequence[Piece] = ()) -> None:
        self.storage = storage
        self.allow_nonfinite = allow_nonfinite
        self.keep = keep
        self.read_bytes = 0
        self._seen: Set[Tuple[str, int]] = set()
        self._scratch: Optional[str] = None
        self._fetcher: Optional[ThreadPoolExecutor] = None
        self._order = list(order)
        self._position = {_key(p): i for i, p in enumerate(self._order)}
        # piece key -> the fetch of its batch: {piece key: its remote ranges' bytes}
        self._ahead: Dict[Tuple[str, int], Future] = {}
        self._consuming: Optional[Future] = None  # the batch of the piece last loaded

    def __enter__(self) -> "InputReader":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=True, cancel_futures=True)
            self._fetcher = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def prefetch(self, piece: Piece) -> None:
        """Start fetching `piece`'s remote ranges (with its batch) in the background, so
        that the network wait overlaps the computing of the pieces before it. If `piece`
        is in a batch fetched already, the batch after that one is fetched: at most one
        batch ahead of the one being computed."""
        pending = self._ahead.get(_key(piece))
        if pending is not None:
            if pending is not self._consuming:
                return  # that batch is the one ahead already
            piece = next((p for p in self._following(piece) if self._ahead.get(_key(p)) is not pending), None)
        if piece is None or not self._needs_fetch(piece) or _key(piece) in self._ahead:
            return
        if self._fetcher is None:
            self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        batch = self._batch(piece)
        future = self._fetcher.submit(self._fetch_batch, batch)
        for member in batch:
            self._ahead[_key(member)] = future

    def _following(self, piece: Piece) -> Iterator[Piece]:
        """The pieces after `piece` in `order` (none if it is not there)."""
        return itertools.islice(self._order, self._position.get(_key(piece), len(self._order)) + 1, None)

    def _needs_fetch(self, piece: Piece) -> bool:
        return any(is_remote(s.path) for s in piece.sources) and not (self.keep and _key(piece) in self._seen)

    def _batch(self, piece: Piece) -> List[Piece]:
        """`piece`, then the pieces after it in `order` not fetched yet, while their remote
        bytes fit FETCH_BATCH_BYTES."""
        batch, size = [piece], piece.remote_bytes
        for following in self._following(piece):
            size += following.remote_bytes
            if size > FETCH_BATCH_BYTES or _key(following) in self._ahead or not self._needs_fetch(following):
                break
            batch.append(following)
        return batch

    def _fetch_batch(self, batch: Sequence[Piece]) -> Dict[Tuple[str, int], List[memoryview]]:
        remote = [[s for s in piece.sources if is_remote(s.path)] for piece in batch]
        data = iter(read_remote_many(self.storage, [(s.path, s.start, s.end, s.version)
                                                    for sources in remote for s in sources]))
        return {_key(piece): [next(data) for _ in sources] for piece, sources in zip(batch, remote)}

    def _fetch(self, piece: Piece) -> List[memoryview]:
        key = _key(piece)
        ahead = self._ahead.pop(key, None)
        if ahead is None:
            ahead = Future()
            batch = self._batch(piece)
            ahead.set_result(self._fetch_batch(batch))
            for member in batch[1:]:
                self._ahead[_key(member)] = ahead
        self._consuming = ahead
        return ahead.result().pop(key)

    def tensors(self, piece: Piece) -> List[torch.Tensor]:
        """The piece's rows of every input, in their stored dtype: remote ranges fetched
        concurrently, local ones memory-mapped; NaN/Inf refused unless allowed."""
        meta = piece.meta
        key = _key(piece)
        first = key not in self._seen
        fetch = self._needs_fetch(piece)
        self._seen.add(key)
        rows = meta.row_end - meta.row_start
        shape = (rows, *meta.shape[1:]) if meta.shape else ()
        fetched = iter(self._fetch(piece) if fetch else ())
        tensors = []
        for i, source in enumerate(piece.sources):
            dtype = SAFETENSORS_TO_TORCH[source.dtype]
            if is_remote(source.path) and fetch:
                data = next(fetched)
                if self.keep:
                    self._write_scratch(key, i, data, meta.tensor)
                tensor = torch.frombuffer(data, dtype=dtype).view(shape) if data else torch.empty(shape, dtype=dtype)
            elif is_remote(source.path):
                tensor = map_range(self._scratch_path(key, i), 0, source.nbytes, source.dtype, shape)
            else:
                path = split_url(source.path)[1]
                if first and source.version and local_version(path) != source.version:
                    raise changed_error(source.path)
                tensor = map_range(path, source.start, source.end, source.dtype, shape)
            if first and not self.allow_nonfinite:
                _check_finite(tensor, piece, source.path)
            tensors.append(tensor)
        if first:
            self.read_bytes += sum(s.nbytes for s in piece.sources)
        return tensors

    def load(self, piece: Piece) -> PieceInputs:
        """The piece's inputs in the compute dtype, as the method takes them."""
        tensors = [t.to(piece.meta.dtype) for t in self.tensors(piece)]
        if piece.with_base:
            return PieceInputs(piece.meta, tensors[0], tuple(tensors[1:]))
        return PieceInputs(piece.meta, None, tuple(tensors))

    def _scratch_path(self, key: Tuple[str, int], source: int) -> str:
        name = hashlib.sha1(f"{key[0]}\0{key[1]}".encode()).hexdigest()[:20]
        return os.path.join(self._scratch or "", f"{name}-{source}")

    def _write_scratch(self, key: Tuple[str, int], source: int, data: memoryview, tensor: str) -> None:
        if self._scratch is None:
            _remove_orphaned_scratch()
            self._scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
        path = self._scratch_path(key, source)
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as err:
            raise InputError(f"could not keep a scratch copy of tensor {tensor!r} in {self._scratch} "
                             f"({err.strerror}); a streamed unit keeps its remote input bytes there between "
                             "passes: point TMPDIR on the workers at a disk with room, or raise "
                             "--memory-per-worker so that the tensor is merged in one piece") from err


def warm_up(storage: Storage, remote_urls: Sequence[str] = ()) -> int:
    """A task that makes a worker process import this module (torch, the methods) and
    connect the clients of the remote inputs' storage (one URL per protocol: s3fs's
    imports and session take about half a second) while the writer starts, so that the
    first unit does not wait for them."""
    for url in remote_urls:
        try:
            fs = storage.read_filesystem(url)  # the direct S3 client needs no warming
            connect = getattr(fs, "connect", None)
            if callable(connect):
                connect()
        except Exception:  # noqa: BLE001 - nothing waits for this task; a unit's read reports the problem
            pass
    return os.getpid()


def scan_unit(unit: WorkUnit, storage: Storage, threads: int = 1) -> WorkerStats:
    """Read every input byte of `unit` and refuse NaN/Inf (the `--check-inputs` pass)."""
    clocks = _clocks()
    torch.set_num_threads(threads)
    reader = InputReader(storage)
    for piece in unit.pieces:
        reader.tensors(piece)
    return _stats(reader.read_bytes, *clocks)


def _stats(read_bytes: int, started: float, cpu_started: float) -> WorkerStats:
    return WorkerStats(os.getpid(), read_bytes, peak_rss(), started, time.process_time() - cpu_started)


def _clocks() -> Tuple[float, float]:
    return time.time(), time.process_time()


def collect_unit(unit: WorkUnit, method_name: str, work: Sequence[Optional[Tuple[Phase, Any]]],
                 storage: Storage, threads: int = 1, allow_nonfinite: bool = False) -> Tuple[List[Any], WorkerStats]:
    """One statistics phase for each piece of `unit` given (phase, carry); None skips a piece."""
    clocks = _clocks()
    torch.set_num_threads(threads)
    method = get_method(method_name)
    partials: List[Any] = []
    reader = InputReader(storage, allow_nonfinite)
    for piece, task in zip(unit.pieces, work):
        if task is None:
            partials.append(None)
            continue
        phase, carry = task
        inputs = reader.load(piece)
        partials.append(method.collect(phase, inputs, carry))
        del inputs
    return partials, _stats(reader.read_bytes, *clocks)


def _sub_pieces(inputs: PieceInputs, rows_per_sub: int, method: MergeMethod) -> List[PieceInputs]:
    """Cut a loaded piece into row ranges small enough for the CPU caches (views, no
    copies), where the method's split policy allows."""
    meta = inputs.meta
    rows = meta.row_end - meta.row_start
    if not meta.shape or rows <= rows_per_sub or not method.splittable(meta):
        return [inputs]
    subs = []
    for r0 in range(0, rows, rows_per_sub):
        r1 = min(rows, r0 + rows_per_sub)
        sub_meta = replace(meta, row_start=meta.row_start + r0, row_end=meta.row_start + r1)
        base = inputs.base[r0:r1] if inputs.base is not None else None
        subs.append(PieceInputs(sub_meta, base, tuple(m[r0:r1] for m in inputs.models)))
    return subs


def _rows_per_sub_piece(meta) -> int:
    row_numel = meta.row_numel or 1
    granule = SPLIT_ALIGN_ELEMENTS // math.gcd(SPLIT_ALIGN_ELEMENTS, row_numel)
    rows = max(1, SUB_PIECE_ELEMENTS // row_numel)
    return max(granule, rows - rows % granule)


def merge_unit(unit: WorkUnit, method_name: str, carries: Sequence[Any], storage: Storage,
               threads: int = 1, allow_nonfinite: bool = False) -> Iterator[Any]:
    """Merge every piece of `unit`: yield the output bytes of each of its chunks in order
    (`unit.chunks`), then the WorkerStats. A Ray generator task, so a streamed unit's
    output leaves the worker piece by piece.

    A piece of a reduction group that lies wholly in the unit (carry WHOLE_GROUP) runs the
    group's whole protocol here: a single piece cut into cache-sized row ranges (every
    method gives the same bits for any split, and small ranges run several times faster
    than whole tensors); a streamed group piece by piece, loading each once per phase.
    """
    clocks = _clocks()
    torch.set_num_threads(threads)
    method = get_method(method_name)
    with InputReader(storage, allow_nonfinite, keep=_loads_pieces_again(unit, carries), order=unit.pieces) as reader:
        results = _merged_pieces(unit, method, carries, reader)
        for chunk in unit.chunks:
            out = np.empty(sum(p.out_nbytes for p in chunk), dtype=np.uint8)
            position = 0
            for piece in chunk:
                for result in next(results):
                    data = result.to(piece.out_dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
                    out[position:position + data.size] = data
                    position += data.size
            yield out
            del out
    yield _stats(reader.read_bytes, *clocks)


def _loads_pieces_again(unit: WorkUnit, carries: Sequence[Any]) -> bool:
    """Whether the task loads some piece more than once: a streamed unit, or a reduction
    group of several pieces run whole here (e.g. a model-wide statistic of a model that fits
    in one unit), whose every phase loads its pieces again."""
    return unit.streamed or any(
        isinstance(carry, str) and carry == WHOLE_GROUP and piece.group == following.group
        for piece, carry, following in zip(unit.pieces, carries, unit.pieces[1:]))


def _merged_pieces(unit: WorkUnit, method: MergeMethod, carries: Sequence[Any],
                   reader: InputReader) -> Iterator[List[torch.Tensor]]:
    """Each piece's merged rows (as one or more consecutive row ranges), in unit order."""
    position = 0
    while position < len(unit.pieces):
        piece, carry = unit.pieces[position], carries[position]
        if not (isinstance(carry, str) and carry == WHOLE_GROUP):
            inputs = reader.load(piece)
            if position + 1 < len(unit.pieces):
                reader.prefetch(unit.pieces[position + 1])
            yield _apply_in_parts(method, inputs, carry)
            position += 1
            continue
        end = position + 1
        while end < len(unit.pieces) and unit.pieces[end].group == piece.group:
            end += 1
        if end < len(unit.pieces):
            reader.prefetch(unit.pieces[end])
        if end - position == 1:
            inputs = reader.load(piece)
            yield run_in_memory(method, _sub_pieces(inputs, _rows_per_sub_piece(piece.meta), method))
        else:
            yield from _run_streamed(method, unit.pieces[position:end], reader)
        position = end


def _apply_in_parts(method: MergeMethod, inputs: PieceInputs, carry: Any) -> List[torch.Tensor]:
    """`method.apply` over a piece with its reduced carry: in cache-sized row ranges when
    the method can split the carry (`split_carry`), else whole."""
    parts = _sub_pieces(inputs, _rows_per_sub_piece(inputs.meta), method)
    carries = method.split_carry(inputs, carry, parts) if len(parts) > 1 else None
    if carries is None:
        return [method.apply(inputs, carry)]
    return [method.apply(part, part_carry) for part, part_carry in zip(parts, carries)]


def _run_streamed(method: MergeMethod, pieces: Sequence[Piece],
                  reader: InputReader) -> Iterator[List[torch.Tensor]]:
    """The whole protocol over one group's pieces, holding one piece's inputs at a time;
    yields each piece's merged rows (as consecutive row ranges)."""

    def load(k: int) -> PieceInputs:
        inputs = reader.load(pieces[k])
        if k + 1 < len(pieces):
            reader.prefetch(pieces[k + 1])
        return inputs

    carries = reduce_statistics(method, [p.meta for p in pieces], load)
    for piece, carry in zip(pieces, carries):
        yield _apply_in_parts(method, reader.load(piece), carry)
