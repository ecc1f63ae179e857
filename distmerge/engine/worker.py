"""What a worker does with one work unit. Stateless and Ray-free: the driver wraps it.

For each piece: map its input rows, cast them to the compute dtype, and run the
method's protocol step (a statistics pass, or apply). Pieces of single-piece reduction
groups run the whole protocol here, so the common case reads its inputs once.
"""

from __future__ import annotations

import os
import math
from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from distmerge.errors import InputError
from distmerge.io.dtypes import SAFETENSORS_TO_TORCH
from distmerge.io.reader import local_version, map_range
from distmerge.io.remote import changed_error, read_remote_many
from distmerge.io.storage import Storage, is_remote, split_url
from distmerge.memory import peak_rss
from distmerge.methods import get_method
from distmerge.methods.base import MergeMethod, Phase, PieceInputs, run_in_memory
from distmerge.planner import SPLIT_ALIGN_ELEMENTS, Piece, WorkUnit

WHOLE_GROUP = "whole group"  # carry marker: this piece is its whole reduction group: run every phase here
# Row ranges of about this many elements keep a method's temporaries in the CPU caches.
SUB_PIECE_ELEMENTS = 768 * 1024


@dataclass(frozen=True)
class WorkerStats:
    pid: int
    read_bytes: int
    peak_rss: int


def _check_finite(tensor: torch.Tensor, piece: Piece, path: str) -> None:
    # A sum is ~20x cheaper than isfinite() and is non-finite whenever a NaN/Inf is present.
    if tensor.numel() and not torch.isfinite(tensor.sum()) and not bool(torch.isfinite(tensor).all()):
        meta = piece.meta
        raise InputError(f"{path}: tensor {meta.tensor!r} holds NaN or Inf values (rows {meta.row_start}.."
                         f"{meta.row_end}); fix the input, or pass --allow-nonfinite to merge anyway")


def _source_tensors(piece: Piece, storage: Storage, allow_nonfinite: bool = False) -> List[torch.Tensor]:
    """The piece's rows of every input, in their stored dtype: remote ranges fetched
    concurrently, local ones memory-mapped; NaN/Inf refused unless allowed."""
    meta = piece.meta
    rows = meta.row_end - meta.row_start
    shape = (rows, *meta.shape[1:]) if meta.shape else ()
    remote = [s for s in piece.sources if is_remote(s.path)]
    fetched = iter(read_remote_many(storage, [(s.path, s.start, s.end, s.version) for s in remote]))
    tensors = []
    for source in piece.sources:
        dtype = SAFETENSORS_TO_TORCH[source.dtype]
        if is_remote(source.path):
            data = next(fetched)
            tensor = torch.frombuffer(data, dtype=dtype).view(shape) if data else torch.empty(shape, dtype=dtype)
        else:
            path = split_url(source.path)[1]
            if source.version and local_version(path) != source.version:
                raise changed_error(source.path)
            tensor = map_range(path, source.start, source.end, source.dtype, shape)
        if not allow_nonfinite:
            _check_finite(tensor, piece, source.path)
        tensors.append(tensor)
    return tensors


def _load(piece: Piece, storage: Storage, allow_nonfinite: bool = False) -> PieceInputs:
    """The piece's inputs in the compute dtype, as the method takes them."""
    tensors = [t.to(piece.meta.dtype) for t in _source_tensors(piece, storage, allow_nonfinite)]
    if piece.with_base:
        return PieceInputs(piece.meta, tensors[0], tuple(tensors[1:]))
    return PieceInputs(piece.meta, None, tuple(tensors))


def scan_unit(unit: WorkUnit, storage: Storage, threads: int = 1) -> WorkerStats:
    """Read every input byte of `unit` and refuse NaN/Inf (the `--check-inputs` pass)."""
    torch.set_num_threads(threads)
    read = 0
    for piece in unit.pieces:
        _source_tensors(piece, storage)
        read += sum(s.nbytes for s in piece.sources)
    return _stats(read)


def _stats(read_bytes: int) -> WorkerStats:
    return WorkerStats(os.getpid(), read_bytes, peak_rss())


def collect_unit(unit: WorkUnit, method_name: str, work: Sequence[Optional[Tuple[Phase, Any]]],
                 storage: Storage, threads: int = 1, allow_nonfinite: bool = False) -> Tuple[List[Any], WorkerStats]:
    """One statistics phase for each piece of `unit` given (phase, carry); None skips a piece."""
    torch.set_num_threads(threads)
    method = get_method(method_name)
    partials: List[Any] = []
    read = 0
    for piece, task in zip(unit.pieces, work):
        if task is None:
            partials.append(None)
            continue
        phase, carry = task
        inputs = _load(piece, storage, allow_nonfinite)
        read += sum(s.nbytes for s in piece.sources)
        partials.append(method.collect(phase, inputs, carry))
        del inputs
    return partials, _stats(read)


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


def apply_unit(unit: WorkUnit, method_name: str, carries: Sequence[Any], storage: Storage,
               threads: int = 1, allow_nonfinite: bool = False) -> Tuple[WorkerStats, np.ndarray]:
    """Merge every piece of `unit`; return stats and the output bytes (pieces in order).

    A piece whose reduction group lies wholly in it (carry WHOLE_GROUP) runs the whole
    protocol here, cut into cache-sized row ranges: every method gives the same bits
    for any split, and small ranges run several times faster than whole tensors.
    """
    torch.set_num_threads(threads)
    method = get_method(method_name)
    out = np.empty(unit.out_bytes, dtype=np.uint8)
    position = 0
    read = 0
    for piece, carry in zip(unit.pieces, carries):
        inputs = _load(piece, storage, allow_nonfinite)
        read += sum(s.nbytes for s in piece.sources)
        if isinstance(carry, str) and carry == WHOLE_GROUP:
            results = run_in_memory(method, _sub_pieces(inputs, _rows_per_sub_piece(piece.meta), method))
        else:
            results = [method.apply(inputs, carry)]
        del inputs
        for result in results:
            data = result.to(piece.out_dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
            out[position:position + data.size] = data
            position += data.size
        del results
    return _stats(read), out
